"""The Vertex AI custom-container surface: in-process on the fake engine, then end to end on the real model."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from mlserve.engine.api import Event, GenerationRequest
from mlserve.engine.fake import FakeEngine, FakeScript
from mlserve.errors import UsageError
from mlserve.names import canonical_text
from mlserve.security.audit import log_files
from mlserve.security.keys import KeyStore, keys_path
from mlserve.server.app import create_app
from mlserve.server.settings import ServerSettings
from mlserve.server.state import ServedModel
from mlserve.server.surfaces.vertex import MAX_INSTANCES, vertex_env
from tests.support.servers import ServerProcess

PREDICT = "/v1/endpoints/123/deployedModels/456:predict"
HEALTH = "/v1/endpoints/123/deployedModels/456"
VERTEX = {"vertex_predict_route": PREDICT, "vertex_health_route": HEALTH}


class PeakEngine(FakeEngine):
    """A fake engine that remembers how many sequences it ran at once."""

    peak = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        async for event in super().generate(request):
            self.peak = max(self.peak, self.stats().active)  # type: ignore[union-attr]
            yield event


def _app(home: Path, *engines: FakeEngine, **settings: Any) -> Starlette:
    models = [ServedModel(e.model_id.split(":")[0], "1", "sha256:" + "ab" * 32, e) for e in engines]
    opts = {"audit_dir": str(home / "audit"), "keys_file": str(keys_path(home)), **VERTEX, **settings}
    return create_app(models, ServerSettings(**opts))


def _records(home: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in log_files(home / "audit") for line in f.read_text().splitlines()]


@pytest.fixture
def client(home: Path) -> Iterator[TestClient]:
    with TestClient(_app(home, FakeEngine("m:1"))) as c:
        yield c


def test_one_prediction_per_instance_in_order(client: TestClient) -> None:
    instances: list[dict[str, Any]] = [
        {"prompt": "a"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"prompt": "abcdefgh"},
    ]
    r = client.post(PREDICT, json={"instances": instances, "parameters": {"max_tokens": 3, "temperature": 0}})
    assert r.status_code == 200, r.text
    assert r.headers["x-mlserve-model"] == "m:1" and r.headers["x-request-id"]
    predictions = r.json()["predictions"]
    # The fake engine's prompt is BOS plus one token per byte, so the counts show each instance's place.
    chat = len("system: Be brief.\nuser: Hi\nassistant:")
    assert [p["prompt_tokens"] for p in predictions] == [2, 1 + chat, 9]
    assert all(p["content"] == "The patient is " and p["finish_reason"] == "length" for p in predictions)
    assert all(p["completion_tokens"] == 3 for p in predictions)


def test_instances_are_decoded_together(home: Path) -> None:
    engine = PeakEngine("m:1", FakeScript(reply="one two three four five six", token_delay=0.05))
    with TestClient(_app(home, engine)) as c:
        r = c.post(PREDICT, json={"instances": [{"prompt": f"p{i}"} for i in range(4)]})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 4
    assert engine.peak == 4, "instances were not in the engine at the same time"


def test_one_audit_record_with_summed_usage(home: Path) -> None:
    with TestClient(_app(home, FakeEngine("m:1"))) as c:
        body = {
            "instances": [{"prompt": "ab"}, {"prompt": "abcd"}],
            "parameters": {"max_tokens": 2, "seed": 7},
            "mlserve": {"deterministic": True},
        }
        r = c.post(PREDICT, json=body)
        assert r.status_code == 200
        texts = [p["content"] for p in r.json()["predictions"]]
        metrics = c.get("/metrics").text
    (record,) = _records(home)
    assert record["route"] == PREDICT and record["status"] == 200 and record["version"] == "1"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (3 + 5, 4)
    assert record["sampling"]["max_tokens"] == 2 and record["sampling"]["seed"] == 7
    assert record["prompt_sha256"] == hashlib.sha256(canonical_text(["ab", "abcd"]).encode()).hexdigest()
    assert record["output_sha256"] == hashlib.sha256(canonical_text(texts).encode()).hexdigest()
    assert record["deterministic"] is True and texts == ["The patient ", "The patient "]
    assert 'mlserve_prompt_tokens_total{model="m:1"} 8.0' in metrics
    assert f'mlserve_requests_total{{model="m:1",route="{PREDICT}",status="200"}} 1.0' in metrics


def test_errors_in_google_shape(client: TestClient) -> None:
    def error(body: Any, status: int) -> dict[str, Any]:
        r = client.post(PREDICT, json=body)
        assert r.status_code == status, r.text
        err: dict[str, Any] = r.json()["error"]
        assert set(err) == {"code", "message", "status"} and err["code"] == status
        return err

    assert error({"instances": [{"prompt": "x"}], "parameters": {"model": "nope"}}, 404)["status"] == "NOT_FOUND"
    both = error({"instances": [{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}]}, 400)
    assert both["status"] == "INVALID_ARGUMENT" and "exactly one of 'messages' and 'prompt'" in both["message"]
    assert "'instances'" in error({"instances": []}, 400)["message"]
    too_many = {"instances": [{"prompt": "x"}] * (MAX_INSTANCES + 1)}
    assert "'instances'" in error(too_many, 400)["message"]
    unknown = error({"instances": [{"prompt": "x"}], "parameters": {"candidateCount": 2}}, 400)
    assert "not a supported field" in unknown["message"]  # refused, never ignored
    assert (
        "'parameters.temperature'"
        in error({"instances": [{"prompt": "x"}], "parameters": {"temperature": 3}}, 400)["message"]
    )
    r = client.post(PREDICT, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"
    r = client.get(PREDICT)
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_failing_instance_is_named_and_stops_the_others(home: Path) -> None:
    engine = FakeEngine("m:1", FakeScript(reply="w " * 40, token_delay=0.02, ctx_size=64))
    with TestClient(_app(home, engine)) as c:
        body = {"instances": [{"prompt": "short"}, {"prompt": "x" * 100}], "parameters": {"max_tokens": 10}}
        r = c.post(PREDICT, json=body)
        state = c.app.state.mlserve  # type: ignore[attr-defined]
        assert state.in_flight == 0
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("instances[1]: The prompt has 101 tokens")
    assert len(engine.requests) == 1 and engine.requests[0].id in engine.aborted  # instance 0 was stopped
    assert [rec["status"] for rec in _records(home)] == [400]


def test_model_choice_is_never_ambiguous(home: Path) -> None:
    with TestClient(_app(home, FakeEngine("a:1"), FakeEngine("b:1"))) as c:
        r = c.post(PREDICT, json={"instances": [{"prompt": "x"}]})
        assert r.status_code == 400 and "set parameters.model" in r.json()["error"]["message"]
        r = c.post(PREDICT, json={"instances": [{"prompt": "x"}], "parameters": {"model": "b"}})
        assert r.status_code == 200 and r.headers["x-mlserve-model"] == "b:1"


def test_keys_scopes_and_open_health(home: Path) -> None:
    store = KeyStore(home)
    metrics_key = store.create("scraper", ["metrics"])[1]
    infer_key = store.create("client", ["infer"])[1]
    with TestClient(_app(home, FakeEngine("m:1"))) as c:
        body = {"instances": [{"prompt": "x"}]}
        assert c.post(PREDICT, json=body).json()["error"]["status"] == "UNAUTHENTICATED"
        r = c.post(PREDICT, json=body, headers={"Authorization": f"Bearer {metrics_key}"})
        assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"
        assert c.post(PREDICT, json=body, headers={"Authorization": f"Bearer {infer_key}"}).status_code == 200
        r = c.get(HEALTH)  # Vertex AI's health checks carry no key
        assert r.status_code == 200 and r.json()["status"] == "ready"


def test_health_route_is_503_until_ready(home: Path) -> None:
    import asyncio

    gate = asyncio.Event()
    with TestClient(_app(home, FakeEngine("m:1", FakeScript(start_gate=gate)))) as c:
        assert c.get(HEALTH).status_code == 503
        r = c.post(PREDICT, json={"instances": [{"prompt": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["status"] == "UNAVAILABLE" and r.headers["retry-after"]


def test_routes_exist_only_when_configured(home: Path) -> None:
    with TestClient(_app(home, FakeEngine("m:1"), vertex_predict_route=None, vertex_health_route=None)) as c:
        assert c.post(PREDICT, json={"instances": [{"prompt": "x"}]}).status_code == 404
        assert "vertex" not in {s.name for s in c.app.state.registry.surfaces}  # type: ignore[attr-defined]


def test_vertex_env() -> None:
    env = vertex_env({"AIP_HTTP_PORT": "8080", "AIP_PREDICT_ROUTE": PREDICT, "AIP_HEALTH_ROUTE": HEALTH})
    assert (env.port, env.predict_route, env.health_route) == (8080, PREDICT, HEALTH)
    assert vertex_env({}).port is None and vertex_env({"AIP_HTTP_PORT": ""}).port is None
    for bad in ({"AIP_HTTP_PORT": "80x"}, {"AIP_HTTP_PORT": "70000"}, {"AIP_PREDICT_ROUTE": "predict"}):
        with pytest.raises(UsageError):
            vertex_env(bad)
    with pytest.raises(UsageError):
        vertex_env({"AIP_HEALTH_ROUTE": "/v1/{x}"})  # braces would become a path parameter


def test_vertex_routes_on_other_routes(home: Path) -> None:
    with pytest.raises(UsageError, match="declared twice"):  # a predict route cannot take over another route
        _app(home, FakeEngine("m:1"), vertex_predict_route="/v1/chat/completions")
    # --container-health-route=/health/ready: that probe already answers as Vertex AI expects.
    with TestClient(_app(home, FakeEngine("m:1"), vertex_health_route="/health/ready")) as c:
        assert c.get("/health/ready").status_code == 200
        assert c.post(PREDICT, json={"instances": [{"prompt": "x"}]}).status_code == 200


def test_serve_refuses_a_bad_aip_port(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIP_HTTP_PORT", "eighty")
    res = cli("serve", "anything")
    assert res.exit_code == 2 and "AIP_HTTP_PORT" in res.stderr


# -- end to end ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.model
def test_vertex_predict_real_model(gemma_home: Path) -> None:
    port = _free_port()
    env = {"AIP_HTTP_PORT": str(port), "AIP_PREDICT_ROUTE": PREDICT, "AIP_HEALTH_ROUTE": HEALTH}
    server = ServerProcess(gemma_home, ["gemma3-270m"], env=env, free_port=False)
    try:
        assert server.listened == f"http://127.0.0.1:{port}"  # AIP_HTTP_PORT, since no --port was given
        assert "Vertex AI reaches the container on 0.0.0.0" in server.log
        server.wait_ready(120, HEALTH)
        before = _metric(httpx.get(server.url + "/metrics").text, "mlserve_decode_steps_total")
        instances = [
            {"messages": [{"role": "user", "content": "Name three symptoms of influenza."}]},
            {"messages": [{"role": "user", "content": "What does a cardiologist treat?"}]},
            {"prompt": "The patient was admitted with chest pain and"},
        ]
        body = {"instances": instances, "parameters": {"max_tokens": 12, "temperature": 0}}
        r = httpx.post(server.url + PREDICT, json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.headers["x-mlserve-model"] == "gemma3-270m:1"
        predictions = r.json()["predictions"]
        assert len(predictions) == 3
        assert all(p["content"].strip() and 0 < p["completion_tokens"] <= 12 for p in predictions)
        after = _metric(httpx.get(server.url + "/metrics").text, "mlserve_decode_steps_total")
        # Decoded one after another, each token would take its own llama_decode step.
        assert after - before < sum(p["completion_tokens"] for p in predictions)
        r = httpx.post(server.url + PREDICT, json={"instances": [{"prompt": "x"}], "parameters": {"model": "nope"}})
        assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"
    finally:
        server.stop()
