"""Route tests in-process: the real app, middleware and surfaces over a fake engine (milliseconds each).

Each ``test_<finding>`` here is named after an issue-11 finding and fails on the wave-1 server.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from mlserve.engine.fake import FakeEngine, FakeScript
from mlserve.security.audit import log_files
from mlserve.security.keys import KeyStore, keys_path
from mlserve.server.app import create_app
from mlserve.server.settings import ServerSettings
from mlserve.server.state import ServedModel, ServerState

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Summarise the visit."}]}


@dataclass
class App:
    """A running in-process app, its fake engine and where it writes."""

    client: TestClient
    engine: FakeEngine
    state: ServerState
    audit: Path
    home: Path

    def records(self) -> list[dict[str, Any]]:
        """Every audit record written so far (the writer is flushed by closing the app)."""
        return [json.loads(line) for f in log_files(self.audit) for line in f.read_text().splitlines()]


def _app(home: Path, engine: FakeEngine, **settings: Any) -> Starlette:
    model = ServedModel("m", "1", "sha256:" + "ab" * 32, engine)
    opts = {"audit_dir": str(home / "audit"), "keys_file": str(keys_path(home)), **settings}
    return create_app([model], ServerSettings(**opts))


@pytest.fixture
def app(home: Path) -> Iterator[App]:
    engine = FakeEngine("m:1")
    asgi = _app(home, engine)
    with TestClient(asgi) as client:
        yield App(client, engine, asgi.state.mlserve, home / "audit", home)


def _closed_records(app: App) -> list[dict[str, Any]]:
    app.client.__exit__(None, None, None)  # lifespan end flushes the audit writer
    return app.records()


def test_deeply_nested_json_is_400(app: App) -> None:
    for body in (b"[" * 100_000, b'{"model": "m", "messages": ' + b"[" * 100_000):
        r = app.client.post("/v1/chat/completions", content=body)
        assert r.status_code == 400, r.text
        assert "nested too deeply" in r.json()["error"]["message"]
    records = _closed_records(app)
    assert [rec["status"] for rec in records] == [400, 400]


def test_unexpected_error_mid_stream_settles_in_flight_and_audit(app: App) -> None:
    app.engine.script.raise_after = 2
    with app.client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error == {"message": "Internal server error.", "type": "server_error", "code": None}
    assert app.state.in_flight == 0 and app.state.models[0].in_flight == 0
    assert 'mlserve_requests_in_flight{model="m:1"} 0.0' in app.client.get("/metrics").text
    assert [rec["status"] for rec in _closed_records(app)] == [500]


def test_stream_failing_midway_ends_with_error_event(app: App) -> None:
    app.engine.script.error_after = 3
    with app.client.stream("POST", "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}) as r:
        chunks = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines() if line and "[DONE]" not in line]
    assert [c["choices"][0]["text"] for c in chunks[:3]] == ["The ", "patient ", "is "]
    assert chunks[-1]["error"]["code"] == "generation_failed"
    assert app.state.in_flight == 0
    assert [rec["status"] for rec in _closed_records(app)] == [503]


def test_non_streamed_generation_failure_is_503_not_500(app: App) -> None:
    app.engine.script.error_after = 1
    r = app.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "generation_failed"


def test_cancelled_request_is_settled(home: Path) -> None:
    """A request cancelled before its first token (uvicorn cancels it at the drain timeout) is still settled."""
    engine = FakeEngine("m:1", FakeScript(reply="word " * 50, token_delay=30))
    asgi = _app(home, engine)
    state: ServerState = asgi.state.mlserve

    async def scenario() -> None:
        body = json.dumps({**CHAT, "stream": True}).encode()
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)  # the client never leaves: only the cancel ends this request
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            raise AssertionError("nothing is sent before the first token")

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
            "app": asgi,
        }
        await engine.start()
        task = asyncio.create_task(asgi(scope, receive, send))
        for _ in range(500):  # admitted and waiting for the first token
            if state.in_flight and engine.requests:
                break
            await asyncio.sleep(0.01)
        assert state.in_flight == 1
        state.draining = True  # the drain timeout has passed
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert state.in_flight == 0 and state.models[0].in_flight == 0
    assert engine.aborted, "the engine's sequence was not aborted"
    writer = asgi.user_middleware[0].kwargs["writer"]
    writer.close()
    records = [json.loads(line) for f in log_files(home / "audit") for line in f.read_text().splitlines()]
    assert [r["status"] for r in records] == [503]


def test_every_inference_route_refuses_a_metrics_key(home: Path) -> None:
    store = KeyStore(home)
    metrics_key = store.create("scraper", ["metrics"])[1]
    infer_key = store.create("client", ["infer"])[1]
    asgi = _app(home, FakeEngine("m:1"))
    with TestClient(asgi) as client:
        specs = asgi.state.registry.specs()
        inference = [s for s in specs if s.scope == "infer"]
        assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= {s.path for s in inference}
        for spec in inference:
            path = spec.path.replace("{name:path}", "m")
            for method in spec.methods:
                r = client.request(method, path, json=CHAT, headers={"Authorization": f"Bearer {metrics_key}"})
                assert r.status_code == 403, (path, r.status_code)
                r = client.request(method, path, json=CHAT, headers={"Authorization": f"Bearer {infer_key}"})
                assert r.status_code not in (401, 403), (path, r.status_code, r.text)
        # Undeclared paths take any valid key, then 404; never an answer.
        assert client.get("/api/nowhere", headers={"x-api-key": metrics_key}).status_code == 404
        assert client.get("/api/nowhere").status_code == 401
        assert client.get("/health/live").status_code == 200  # probes stay open
    assert all(s.scope in ("open", "infer", "metrics", "admin") for s in specs)


def test_refusals_are_settled_once_in_the_surface_shape(home: Path) -> None:
    KeyStore(home).create("client", ["infer"])
    asgi = _app(home, FakeEngine("m:1"))
    with TestClient(asgi) as client:
        r = client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer" and r.headers["x-request-id"]
        r = client.get("/v2/models/m/ready")
        assert r.status_code == 401 and set(r.json()) == {"error"}  # KServe's shape
    records = [json.loads(line) for f in log_files(home / "audit") for line in f.read_text().splitlines()]
    assert [(r["route"], r["status"]) for r in records] == [("/v1/chat/completions", 401)]


def test_v2_model_ready_reports_canary_not_random(home: Path) -> None:
    stable_engine, canary_engine = FakeEngine("m:1"), FakeEngine("m:2")
    asgi = _app(home, stable_engine)
    state: ServerState = asgi.state.mlserve
    with TestClient(asgi) as client:
        canary = ServedModel("m", "2", "sha256:" + "cd" * 32, canary_engine)  # loading: never started
        state.route("m", state.models[0], (canary, 50.0))
        answers = {client.get("/v2/models/m/ready").status_code for _ in range(40)}
        assert answers == {503}, "readiness must not depend on a random canary pick"
        canary_engine.state = "ready"
        assert client.get("/v2/models/m/ready").status_code == 200


def test_liveness_fails_when_engine_dead(app: App) -> None:
    assert app.client.get("/health/live").status_code == 200
    app.engine.state, app.engine.detail = "dead", "llama_decode failed with code -3"
    r = app.client.get("/health/live")
    assert r.status_code == 503 and r.json()["status"] == "dead"
    assert app.client.get("/v2/health/live").status_code == 503


def test_log_content_logs_streamed_completion(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    asgi = _app(home, FakeEngine("m:1"), log_content=True)
    with caplog.at_level(logging.INFO, logger="mlserve.content"), TestClient(asgi) as client:
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            list(r.iter_lines())
    content = [rec.getMessage() for rec in caplog.records if rec.name == "mlserve.content"]
    assert any("prompt=" in line and "Summarise the visit." in line for line in content)
    assert any(line.endswith('completion="The patient is stable and ready for discharge."') for line in content)


def test_no_request_text_logged_by_default(app: App, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        app.client.post("/v1/chat/completions", json=CHAT)
        app.client.post("/v1/chat/completions", json={**CHAT, "bogus_Summarise": 1})
    assert "request " in caplog.text
    assert "Summarise" not in caplog.text and "patient" not in caplog.text


def test_errors_keep_openai_shape_and_headers(app: App) -> None:
    r = app.client.post("/v1/chat/completions", json={**CHAT, "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = app.client.post("/v1/completions", json={"model": "m", "prompt": "x", "temperature": 9})
    assert r.status_code == 400 and "'temperature'" in r.json()["error"]["message"]
    r = app.client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 5000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = app.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["x-mlserve-model"] == "m:1"
    assert app.client.get("/nowhere").json()["error"]["message"] == "Not Found"


def test_audit_append_does_not_block_the_event_loop(home: Path) -> None:
    """flock and fsync of the audit log happen on the writer's thread, never on the event loop."""
    import threading
    import time

    import httpx

    from mlserve.security.audit import AuditLog

    release = threading.Event()
    original = AuditLog.append

    def slow_append(self: AuditLog, event: dict[str, Any]) -> dict[str, Any]:
        release.wait(5)  # a disk that stalls (NFS, a full fsync queue)
        return original(self, event)

    engine = FakeEngine("m:1")
    asgi = _app(home, engine)

    async def scenario() -> float:
        await engine.start()  # ASGITransport runs no lifespan
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = await client.post("/v1/chat/completions", json=CHAT)  # its record is now stuck writing
            assert first.status_code == 200
            t0 = time.perf_counter()
            second = await client.post("/v1/chat/completions", json=CHAT)
            elapsed = time.perf_counter() - t0
            assert second.status_code == 200
            return elapsed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AuditLog, "append", slow_append)
        try:
            elapsed = asyncio.run(scenario())
        finally:
            release.set()
    assert elapsed < 1.0, f"a request waited {elapsed:.2f} s behind a stalled audit write"
    writer = asgi.user_middleware[0].kwargs["writer"]
    writer.close()
    records = [json.loads(line) for f in log_files(home / "audit") for line in f.read_text().splitlines()]
    assert [r["status"] for r in records] == [200, 200]
