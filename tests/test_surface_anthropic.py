"""The Anthropic Messages surface: route tests on the fake engine, then the official `anthropic` SDK on the model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from mlserve.engine.fake import BOS, FakeEngine, FakeScript
from mlserve.security.audit import log_files
from mlserve.security.keys import KeyStore, keys_path
from mlserve.server.app import create_app
from mlserve.server.settings import ServerSettings
from mlserve.server.state import ServedModel
from tests.support.inproc import CANARIES, CANARY, App
from tests.support.servers import ServerProcess, start_server

REPLY = "The patient is stable and ready for discharge."
COUNT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "Summarise."}]}
BODY: dict[str, Any] = {**COUNT, "max_tokens": 64}  # count_tokens takes no max_tokens, as in Anthropic's API


def _start(home: Path, script: FakeScript | None = None, **settings: Any) -> tuple[TestClient, FakeEngine]:
    engine = FakeEngine("m:1", script)
    model = ServedModel("m", "1", "sha256:" + "ab" * 32, engine, ctx_size=4096)
    opts = {"audit_dir": str(home / "audit"), "keys_file": str(keys_path(home)), **settings}
    return TestClient(create_app([model], ServerSettings(**opts))), engine


@pytest.fixture
def app(home: Path) -> Iterator[App]:
    client, engine = _start(home)
    with client:
        yield App(client, engine, home)


def _prompt_text(engine: FakeEngine) -> str:
    """What the fake engine was asked to continue (its tokens are BOS and UTF-8 bytes)."""
    return bytes(t for t in engine.requests[-1].prompt_tokens if t != BOS).decode()


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, data) of each Server-Sent Event; every event must have both."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


# -- messages ------------------------------------------------------------------


def test_message_in_anthropic_shape(app: App) -> None:
    r = app.client.post("/v1/messages", json=BODY, headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text
    assert r.headers["request-id"] == r.headers["x-request-id"] and r.headers["x-mlserve-model"] == "m:1"
    body = r.json()
    assert body["id"].startswith("msg_") and body["type"] == "message" and body["role"] == "assistant"
    assert body["model"] == "m:1" and body["content"] == [{"type": "text", "text": REPLY}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    assert body["usage"] == {"input_tokens": len(app.engine.requests[-1].prompt_tokens), "output_tokens": 8}


def test_system_blocks_and_turns_reach_the_template(app: App) -> None:
    body = {
        **BODY,
        "system": [
            {"type": "text", "text": "You write notes.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be brief."},
        ],
        "messages": [
            {"role": "user", "content": "First."},
            {"role": "user", "content": [{"type": "text", "text": "Second."}]},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "Go."},
        ],
        "metadata": {"user_id": "opaque-7"},
        "service_tier": "auto",
    }
    r = app.client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    assert _prompt_text(app.engine) == (
        "system: You write notes.\n\nBe brief.\nuser: First.\n\nSecond.\nassistant: Noted.\nuser: Go.\nassistant:"
    )
    r = app.client.post("/v1/messages", json={**BODY, "system": "Plain system."})
    assert r.status_code == 200 and _prompt_text(app.engine).startswith("system: Plain system.\nuser: Summarise.")


def test_sampling_reaches_the_engine_and_max_tokens_is_reported(app: App) -> None:
    body = {**BODY, "max_tokens": 3, "temperature": 0.2, "top_p": 0.9, "top_k": 5, "stop_sequences": ["zz"]}
    r = app.client.post("/v1/messages", json=body)
    assert r.status_code == 200
    s = app.engine.requests[-1].sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.stop[0]) == (3, 0.2, 0.9, 5, "zz")
    assert r.json()["stop_reason"] == "max_tokens" and r.json()["usage"]["output_tokens"] == 3


def test_stop_sequence_is_named(app: App) -> None:
    r = app.client.post("/v1/messages", json={**BODY, "stop_sequences": ["zz", "ready"]})
    assert r.status_code == 200
    body = r.json()
    assert body["content"][0]["text"] == "The patient is stable and "
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "ready")


def test_output_config_schema_is_enforced_or_refused(app: App) -> None:
    schema = {"type": "object", "properties": {"dx": {"type": "string"}}, "required": ["dx"]}
    body = {**BODY, "output_config": {"format": {"type": "json_schema", "schema": schema}}}
    r = app.client.post("/v1/messages", json=body)
    assert r.status_code == 200 and '"dx"' in (app.engine.requests[-1].sampling.grammar or "")
    schema = {"type": "object", "properties": {"dx": {"type": "string", "pattern": "^[A-Z]"}}}
    body = {**BODY, "output_config": {"format": {"type": "json_schema", "schema": schema}}}
    r = app.client.post("/v1/messages", json=body)
    assert r.status_code == 400 and "pattern" in r.json()["error"]["message"]
    r = app.client.post("/v1/messages", json={**BODY, "mlserve": {"deterministic": True}})
    assert r.status_code == 200 and app.engine.requests[-1].deterministic


def test_stream_has_the_event_sequence_the_sdk_expects(app: App) -> None:
    r = app.client.post("/v1/messages", json={**BODY, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    names = [name for name, _ in events]
    deltas = names.count("content_block_delta")
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == REPLY and all(d["delta"]["type"] == "text_delta" for n, d in events if n == "content_block_delta")
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {"output_tokens": 8}


def test_error_mid_stream_is_an_error_event(app: App) -> None:
    app.engine.script.error_after = 2
    r = app.client.post("/v1/messages", json={**BODY, "stream": True})
    assert r.status_code == 200
    events = _events(r.text)
    assert events[-1][0] == "error" and "message_stop" not in [n for n, _ in events]
    assert events[-1][1]["type"] == "error" and events[-1][1]["error"]["type"] == "api_error"
    assert [rec["status"] for rec in app.records()] == [503]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "'tools'"),
        ({"tool_choice": {"type": "auto"}}, "'tool_choice'"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "'thinking'"),
        ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "'mcp_servers'"),
        ({"container": "c-1"}, "'container'"),
        ({"inference_geo": "us"}, "'inference_geo'"),
        ({"output_config": {"effort": "high"}}, "effort"),
        ({"speed": "fast"}, "speed"),
        ({"temperature": 1.5}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": None}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'image' blocks"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]}, "'tool_result'"),
        ({"messages": [{"role": "user", "content": [{"type": "x-" + CANARY}]}]}, "this content block type"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The"}]}, "prefill"),
        ({"messages": [{"role": "system", "content": "Hi"}]}, "role"),
        ({"frobnicate": 1}, "not supported"),
    ],
)
def test_what_cannot_be_honoured_is_400_naming_it(app: App, change: dict[str, Any], named: str) -> None:
    body = {k: v for k, v in {**BODY, **change}.items() if v is not None}
    r = app.client.post("/v1/messages", json=body)
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert named in error["error"]["message"] and CANARY not in r.text
    assert not app.engine.requests


def test_unknown_model_and_bad_bodies_in_anthropic_shape(app: App) -> None:
    for path, body in (("/v1/messages", BODY), ("/v1/messages/count_tokens", COUNT)):
        r = app.client.post(path, json={**body, "model": "nope"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error" and r.json()["type"] == "error"
        r = app.client.post(path, content=b"{nope")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_refusals_map_to_anthropic_error_types(home: Path) -> None:
    store = KeyStore(home)
    metrics, infer = store.create("scraper", ["metrics"])[1], store.create("client", ["infer"])[1]
    client, _ = _start(home, FakeScript(max_active=0), max_body_bytes=1024)
    with client:
        r = client.post("/v1/messages", json=BODY)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        for path, body in (("/v1/messages", BODY), ("/v1/messages/count_tokens", COUNT)):
            r = client.post(path, json=body, headers={"x-api-key": metrics})
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        r = client.post("/v1/messages", json={**BODY, "system": "x" * 2000}, headers={"x-api-key": infer})
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
        r = client.post("/v1/messages", json=BODY, headers={"x-api-key": infer})
        assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error" and r.headers["retry-after"]
        r = client.post("/v1/messages/count_tokens", json=COUNT, headers={"x-api-key": infer})
        assert r.status_code == 200
        r = client.post("/v1/messages/count_tokens", json=BODY, headers={"x-api-key": infer})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_count_tokens_uses_the_chat_template_and_is_audited(app: App) -> None:
    body = {"model": "m", "system": "Sys.", "messages": [{"role": "user", "content": "Hello there."}]}
    r = app.client.post("/v1/messages/count_tokens", json=body, headers={"x-request-id": "ct-1"})
    assert r.status_code == 200 and r.headers["x-mlserve-model"] == "m:1"
    assert r.json() == {"input_tokens": 1 + len("system: Sys.\nuser: Hello there.\nassistant:")}
    assert not app.engine.requests  # nothing was generated
    (record,) = app.records()
    assert record["request_id"] == "ct-1" and record["route"] == "/v1/messages/count_tokens"
    assert record["status"] == 200 and record["prompt_tokens"] == r.json()["input_tokens"]
    assert record["prompt_sha256"] and record["completion_tokens"] is None


def test_one_audit_record_per_request_and_no_text_in_logs(app: App, caplog: pytest.LogCaptureFixture) -> None:
    body = {**BODY, "messages": [{"role": "user", "content": CANARY}]}
    sent = [
        ({**body}, 200),
        ({**body, "stream": True}, 200),
        ({**body, "model": CANARY}, 404),
        ({**body, "tools": [{"name": CANARY}]}, 400),
        ({**body, CANARY: 1}, 400),
    ]
    with caplog.at_level(logging.DEBUG):
        for i, (payload, status) in enumerate(sent):
            r = app.client.post("/v1/messages", json=payload, headers={"x-request-id": f"a-{i}"})
            assert r.status_code == status, r.text
            assert status == 200 or all(c not in r.text for c in CANARIES)
    records = app.records()
    assert [(r["request_id"], r["status"]) for r in records] == [(f"a-{i}", s) for i, (_, s) in enumerate(sent)]
    audit_text = "".join(f.read_text() for f in log_files(app.home / "audit"))
    for canary in CANARIES:
        assert canary not in caplog.text and canary not in audit_text


# -- the official SDK on the real model ----------------------------------------


@dataclass
class Served:
    """A real server on the real model, with its own home (and so its own audit log)."""

    server: ServerProcess
    home: Path


@pytest.fixture(scope="module")
def served(gemma_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("anthropic") / "home"  # hard links: no copy of the model
    shutil.copytree(gemma_home, home, copy_function=os.link)
    with start_server(home, "--parallel", "2", "--ctx-size", "1024") as server:
        yield Served(server, home)


def _sdk(served: Served, **headers: str) -> Any:
    import anthropic

    return anthropic.Anthropic(base_url=served.server.url, api_key="unused", max_retries=0, default_headers=headers)


@pytest.mark.model
def test_official_sdk_create_stream_and_count(served: Served) -> None:
    client = _sdk(served)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = {"temperature": 0}
    msg = client.messages.create(model="gemma3-270m", max_tokens=12, messages=question, extra_body=greedy)
    assert msg.role == "assistant" and msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens") and 0 < msg.usage.output_tokens <= 12
    assert msg.usage.input_tokens > 0 and msg.model == "gemma3-270m:1"

    with client.messages.stream(model="gemma3-270m", max_tokens=12, messages=question, extra_body=greedy) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == final.content[0].text == msg.content[0].text  # greedy: same
    assert final.stop_reason == msg.stop_reason and final.usage.output_tokens == msg.usage.output_tokens

    counted = client.messages.count_tokens(model="gemma3-270m", messages=question)
    assert counted.input_tokens == msg.usage.input_tokens

    # Gemma 3 270M echoes this question greedily: a stop string from it is reached within a few tokens.
    stopped = client.messages.create(
        model="gemma3-270m", max_tokens=40, messages=question, stop_sequences=["zzz", "France"], extra_body=greedy
    )
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "France")
    assert stopped.content[0].text and "France" not in stopped.content[0].text


@pytest.mark.model
def test_official_sdk_sees_errors_in_its_own_types(served: Served) -> None:
    import anthropic

    client = _sdk(served)
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=hi)
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as tools:
        client.messages.create(
            model="gemma3-270m", max_tokens=4, messages=hi, tools=[{"name": "f", "input_schema": {"type": "object"}}]
        )
    assert "'tools'" in tools.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as too_long:
        client.messages.create(model="gemma3-270m", max_tokens=5000, messages=hi)
    assert "1024" in too_long.value.body["error"]["message"]


@pytest.mark.model
def test_canary_never_in_server_log_and_one_record_each(served: Served) -> None:
    import anthropic

    client = _sdk(served, **{"x-request-id": "anthropic-canary"})
    told = [{"role": "user", "content": CANARY}]
    client.messages.create(model="gemma3-270m", max_tokens=2, messages=told)
    with client.messages.stream(model="gemma3-270m", max_tokens=2, messages=told) as stream:
        stream.get_final_message()
    client.messages.count_tokens(model="gemma3-270m", messages=told)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model=CANARY, max_tokens=2, messages=told)
    audit = served.home / "audit"

    def mine() -> list[dict[str, Any]]:
        return [
            rec
            for f in sorted(audit.glob("*.jsonl"))
            for rec in map(json.loads, f.read_text().splitlines())
            if rec.get("request_id") == "anthropic-canary"
        ]

    deadline = time.monotonic() + 10
    while len(mine()) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r["status"] for r in mine()] == [200, 200, 200, 404]
    text = "".join(f.read_text() for f in audit.glob("*.jsonl"))
    for canary in CANARIES:
        assert canary not in served.server.log and canary not in text
    assert httpx.get(served.server.url + "/health/ready").status_code == 200
