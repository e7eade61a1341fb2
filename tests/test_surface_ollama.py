"""The Ollama surface: route tests on the fake engine, then the official `ollama` client on the real model."""

from __future__ import annotations

import json
import logging
import os
import shutil
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
GGUF = {"architecture": "gemma3", "parameter_count": 268_098_176, "file_type": "Q4_K_M", "context_length": 32768}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Summarise the visit."}]}


def _model(engine: FakeEngine) -> ServedModel:
    served = {"size": 253_113_024, "gguf": GGUF, "ctx_size": 4096, "embeddings": engine.script.embeddings}
    return ServedModel("m", "1", "sha256:" + "ab" * 32, engine, **served)


@pytest.fixture
def app(home: Path) -> Iterator[App]:
    engine = FakeEngine("m:1")
    settings = ServerSettings(audit_dir=str(home / "audit"), keys_file=str(keys_path(home)))
    with TestClient(create_app([_model(engine)], settings)) as client:
        yield App(client, engine, home)


def _prompt_text(engine: FakeEngine) -> str:
    """What the fake engine was asked to continue (its tokens are BOS and UTF-8 bytes)."""
    return bytes(t for t in engine.requests[-1].prompt_tokens if t != BOS).decode()


def _lines(r: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in r.text.splitlines() if line]


# -- probes and listings -------------------------------------------------------


def test_root_and_version_are_open_probes_listings_need_a_key(home: Path) -> None:
    key = KeyStore(home).create("client", ["infer"])[1]
    settings = ServerSettings(audit_dir=str(home / "audit"), keys_file=str(keys_path(home)))
    with TestClient(create_app([_model(FakeEngine("m:1"))], settings)) as client:
        r = client.get("/")
        assert r.status_code == 200 and r.text == "Ollama is running"
        assert r.headers["content-type"].startswith("text/plain")
        assert client.head("/").status_code == 200
        version = client.get("/api/version").json()["version"]
        assert tuple(int(x) for x in version.split(".")) >= (0, 6, 4)  # what Open WebUI, Continue, Raycast demand
        assert client.get("/api/tags").status_code == 401
        assert client.get("/api/tags", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_tags_lists_name_and_version_with_digest_size_and_details(app: App) -> None:
    models = app.client.get("/api/tags").json()["models"]
    assert [m["name"] for m in models] == ["m", "m:1"]
    for m in models:
        assert m["model"] == m["name"]
        assert m["digest"] == "ab" * 32 and m["size"] == 253_113_024
        assert m["modified_at"].endswith("Z")
        assert m["details"] == {
            "parent_model": "",
            "format": "gguf",
            "family": "gemma3",
            "families": ["gemma3"],
            "parameter_size": "268M",
            "quantization_level": "Q4_K_M",
        }


def test_show_and_ps(app: App) -> None:
    r = app.client.post("/api/show", json={"model": "m:latest"})
    assert r.status_code == 200 and r.headers["x-mlserve-model"] == "m:1"
    shown = r.json()
    assert shown["details"]["quantization_level"] == "Q4_K_M"
    assert shown["model_info"]["general.architecture"] == "gemma3"
    assert shown["model_info"]["gemma3.context_length"] == 32768
    assert "num_ctx 4096" in shown["parameters"].splitlines()
    assert shown["capabilities"] == ["completion", "embedding"]
    running = app.client.get("/api/ps").json()["models"]
    assert {m["name"] for m in running} == {"m", "m:1"} and all(m["context_length"] == 4096 for m in running)
    app.engine.state = "loading"
    assert app.client.get("/api/ps").json()["models"] == []


# -- chat and generate ---------------------------------------------------------


def test_chat_streams_ndjson_by_default(app: App) -> None:
    r = app.client.post("/api/chat", json=CHAT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = _lines(r)
    assert all(not line["done"] for line in lines[:-1]) and len(lines) > 2
    assert "".join(line["message"]["content"] for line in lines) == REPLY
    last = lines[-1]
    assert last["done"] and last["done_reason"] == "stop" and last["message"] == {"role": "assistant", "content": ""}
    assert last["eval_count"] == len(REPLY.split()) and last["prompt_eval_count"] == len(
        app.engine.requests[-1].prompt_tokens
    )
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(last[key], int) and last[key] >= 0
    assert last["total_duration"] >= last["eval_duration"] > 0
    assert _prompt_text(app.engine) == "user: Summarise the visit.\nassistant:"


def test_chat_without_streaming_is_one_object(app: App) -> None:
    r = app.client.post("/api/chat", json={**CHAT, "stream": False, "options": {"num_predict": 3}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["message"] == {"role": "assistant", "content": "The patient is "}
    assert body["done"] and body["done_reason"] == "length" and body["eval_count"] == 3
    assert body["model"] == "m"


def test_generate_goes_through_the_chat_template_unless_raw(app: App) -> None:
    body = {"model": "m", "prompt": "Why?", "system": "Be brief.", "stream": False}
    r = app.client.post("/api/generate", json=body)
    assert r.status_code == 200 and r.json()["response"] == REPLY and r.json()["done_reason"] == "stop"
    assert _prompt_text(app.engine) == "system: Be brief.\nuser: Why?\nassistant:"
    r = app.client.post("/api/generate", json={"model": "m", "prompt": "Why?", "raw": True, "stream": False})
    assert r.status_code == 200 and _prompt_text(app.engine) == "Why?"
    lines = _lines(app.client.post("/api/generate", json={"model": "m", "prompt": "Why?"}))
    assert "".join(line["response"] for line in lines) == REPLY and lines[-1]["done"]


def test_options_reach_the_sampler(app: App) -> None:
    options = {
        "temperature": 0.3,
        "top_k": 7,
        "top_p": 0.5,
        "min_p": 0.1,
        "seed": 42,
        "num_predict": 5,
        "stop": ["ready"],
        "repeat_penalty": 1.2,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.25,
        "num_ctx": 2048,
        "num_thread": 4,  # accepted and ignored: tunes the server, cannot change the output
        "mirostat": 0,  # accepted at the value that turns it off
        "repeat_last_n": 64,
    }
    r = app.client.post("/api/chat", json={**CHAT, "stream": False, "options": options})
    assert r.status_code == 200, r.text
    s = app.engine.requests[-1].sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.seed, s.max_tokens) == (0.3, 7, 0.5, 0.1, 42, 5)
    assert (s.repeat_penalty, s.frequency_penalty, s.presence_penalty) == (1.2, 0.5, 0.25)
    assert s.stop[0] == "ready"
    r = app.client.post("/api/chat", json={**CHAT, "stream": False, "options": {"seed": -1, "num_predict": -1}})
    assert r.status_code == 200
    assert app.engine.requests[-1].sampling.seed is None and app.engine.requests[-1].sampling.max_tokens == 512


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"options": {"mirostat": 2}}, "'mirostat'"),
        ({"options": {"tfs_z": 0.5}}, "'tfs_z'"),
        ({"options": {"typical_p": 0.7}}, "'typical_p'"),
        ({"options": {"repeat_last_n": 128}}, "'repeat_last_n'"),
        ({"options": {"penalize_newline": True}}, "'penalize_newline'"),
        ({"options": {"vocab_only": True}}, "'vocab_only'"),
        ({"options": {"num_ctx": 8192}}, "num_ctx"),
        ({"options": {"temperature": 9}}, "temperature"),
        ({"options": {"frobnicate": 1}}, "not a supported field"),
        ({"think": True}, "'think'"),
        ({"logprobs": True}, "'logprobs'"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "'tools'"),
        ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "last message"),
        ({"stream": "often"}, "stream"),
        ({"format": "yaml"}, "format"),
    ],
)
def test_what_cannot_be_honoured_is_400_naming_it(app: App, body: dict[str, Any], named: str) -> None:
    r = app.client.post("/api/chat", json={**CHAT, **body})
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and named in r.json()["error"]
    assert not app.engine.requests


@pytest.mark.parametrize("field", ["suffix", "template", "context", "images"])
def test_generate_refuses_what_it_does_not_support(app: App, field: str) -> None:
    value: Any = [1, 2] if field == "context" else ["aGk="] if field == "images" else "x"
    r = app.client.post("/api/generate", json={"model": "m", "prompt": "Hi", field: value})
    assert r.status_code == 400 and f"'{field}'" in r.json()["error"]


def test_format_is_enforced_by_a_grammar_or_refused(app: App) -> None:
    r = app.client.post("/api/chat", json={**CHAT, "stream": False, "format": "json"})
    assert r.status_code == 200
    assert json.loads(app.engine.requests[-1].sampling.grammar.removeprefix("fake-grammar ")) == {"type": "object"}
    schema = {"type": "object", "properties": {"bp": {"type": "string"}}, "required": ["bp"]}
    r = app.client.post("/api/generate", json={"model": "m", "prompt": "BP?", "stream": False, "format": schema})
    assert r.status_code == 200 and '"bp"' in (app.engine.requests[-1].sampling.grammar or "")
    r = app.client.post("/api/chat", json={**CHAT, "format": ""})
    assert r.status_code == 200 and app.engine.requests[-1].sampling.grammar is None
    pattern = {"type": "object", "properties": {"mrn": {"type": "string", "pattern": "^[0-9]+$"}}}
    r = app.client.post("/api/chat", json={**CHAT, "format": pattern})
    assert r.status_code == 400 and "pattern" in r.json()["error"]


def test_deterministic_extension_reaches_the_engine(app: App) -> None:
    r = app.client.post("/api/chat", json={**CHAT, "stream": False, "mlserve": {"deterministic": True}})
    assert r.status_code == 200 and app.engine.requests[-1].deterministic
    r = app.client.post("/api/generate", json={"model": "m", "prompt": "x", "stream": False})
    assert r.status_code == 200 and not app.engine.requests[-1].deterministic


def test_embed_and_legacy_embeddings(app: App) -> None:
    r = app.client.post("/api/embed", json={"model": "m", "input": ["chest pain", "pain in the chest", "a blue car"]})
    assert r.status_code == 200, r.text
    body = r.json()
    vectors = body["embeddings"]
    assert body["model"] == "m" and len(vectors) == 3 and body["prompt_eval_count"] > 0
    assert all(abs(sum(x * x for x in v) - 1) < 1e-6 for v in vectors)
    assert isinstance(body["total_duration"], int) and body["load_duration"] == 0
    one = app.client.post("/api/embed", json={"model": "m", "input": "chest pain", "dimensions": 8}).json()
    assert len(one["embeddings"]) == 1 and len(one["embeddings"][0]) == 8
    legacy = app.client.post("/api/embeddings", json={"model": "m:latest", "prompt": "chest pain"})
    assert legacy.status_code == 200 and legacy.json() == {"embedding": vectors[0]}
    for bad, named in (
        ({"input": []}, "input"),
        ({"input": "x" * 600, "truncate": True}, "512"),  # never cut: too long is a 400, truncate or not
        ({"input": "x", "options": {"num_ctx": 9000}}, "num_ctx"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
    ):
        r = app.client.post("/api/embed", json={"model": "m", **bad})
        assert r.status_code == 400 and named in r.json()["error"], (bad, r.text)


def test_embed_needs_a_model_served_with_embeddings(home: Path) -> None:
    engine = FakeEngine("m:1", FakeScript(embeddings=False))
    settings = ServerSettings(audit_dir=str(home / "audit"), keys_file=str(keys_path(home)))
    with TestClient(create_app([_model(engine)], settings)) as client:
        r = client.post("/api/embed", json={"model": "m", "input": "x"})
        assert r.status_code == 400 and "--embeddings" in r.json()["error"]
        assert client.post("/api/show", json={"model": "m"}).json()["capabilities"] == ["completion"]


def test_empty_request_loads_the_model_and_unload_is_refused(app: App) -> None:
    r = app.client.post("/api/chat", json={"model": "m", "messages": []})
    assert r.status_code == 200 and r.json()["done_reason"] == "load" and r.json()["done"]
    r = app.client.post("/api/generate", json={"model": "m:latest"})
    assert r.status_code == 200 and r.json()["done_reason"] == "load" and r.json()["response"] == ""
    r = app.client.post("/api/generate", json={"model": "m", "keep_alive": 0})
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]
    assert not app.engine.requests
    r = app.client.post("/api/chat", json={**CHAT, "keep_alive": "5m", "stream": False})
    assert r.status_code == 200  # keep_alive is accepted: served models stay loaded anyway


def test_error_mid_stream_is_one_error_line(app: App) -> None:
    app.engine.script.error_after = 2
    r = app.client.post("/api/chat", json=CHAT)
    assert r.status_code == 200
    lines = _lines(r)
    assert [line["message"]["content"] for line in lines[:-1]] == ["The ", "patient "]
    assert set(lines[-1]) == {"error"} and "llama_decode failed" in lines[-1]["error"]
    assert [rec["status"] for rec in app.records()] == [503]


def test_unknown_model_is_404_in_ollama_shape_on_every_route(app: App) -> None:
    bodies = {
        "/api/chat": {**CHAT, "model": "nope"},
        "/api/generate": {"model": "nope", "prompt": "x"},
        "/api/embed": {"model": "nope", "input": "x"},
        "/api/embeddings": {"model": "nope", "prompt": "x"},
        "/api/show": {"model": "nope"},
    }
    for path, body in bodies.items():
        r = app.client.post(path, json=body)
        assert r.status_code == 404, (path, r.text)
        assert set(r.json()) == {"error"} and "not found" in r.json()["error"] and "/api/tags" in r.json()["error"]


def test_bad_bodies_are_400_in_ollama_shape(app: App) -> None:
    for path in ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show"):
        r = app.client.post(path, content=b"{not json")
        assert r.status_code == 400 and set(r.json()) == {"error"}, path
        r = app.client.post(path, json={"model": 5})
        assert r.status_code == 400 and set(r.json()) == {"error"}, path


@pytest.mark.parametrize(
    ("method", "path", "command"),
    [
        ("POST", "/api/pull", "mlserve pull"),
        ("POST", "/api/push", "mlserve export"),
        ("POST", "/api/create", "mlserve pack"),
        ("POST", "/api/copy", "mlserve promote"),
        ("DELETE", "/api/delete", "mlserve rm"),
        ("POST", "/api/blobs/sha256:00", "mlserve pack"),
        ("HEAD", "/api/blobs/sha256:00", None),
    ],
)
def test_model_management_is_refused_naming_the_cli(app: App, method: str, path: str, command: str | None) -> None:
    r = app.client.request(method, path, json={"model": "m"})
    assert r.status_code == 403
    if command is not None:
        assert command in r.json()["error"] and "admin" in r.json()["error"]


def test_metrics_key_refused_on_every_ollama_route(home: Path) -> None:
    store = KeyStore(home)
    metrics, infer = store.create("scraper", ["metrics"])[1], store.create("client", ["infer"])[1]
    settings = ServerSettings(audit_dir=str(home / "audit"), keys_file=str(keys_path(home)))
    with TestClient(create_app([_model(FakeEngine("m:1"))], settings)) as client:
        for method, path in [("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/show")] + [
            ("POST", p) for p in ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings")
        ]:
            r = client.request(method, path, json=CHAT, headers={"Authorization": f"Bearer {metrics}"})
            assert r.status_code == 403 and set(r.json()) == {"error"}, path
            r = client.request(method, path, json=CHAT, headers={"Authorization": f"Bearer {infer}"})
            assert r.status_code not in (401, 403), (path, r.text)
        r = client.post("/api/pull", json={"model": "m"}, headers={"Authorization": f"Bearer {infer}"})
        assert r.status_code == 403 and "'admin' scope" in r.json()["error"]


def test_one_audit_record_per_request_and_no_text_in_logs(app: App, caplog: pytest.LogCaptureFixture) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": CANARY}]}
    sent = [
        ("/api/chat", {**chat, "stream": False}, 200),
        ("/api/chat", chat, 200),
        ("/api/generate", {"model": "m", "prompt": CANARY, "stream": False}, 200),
        ("/api/chat", {**chat, "model": CANARY}, 404),
        ("/api/chat", {**chat, "options": {"mirostat": 1}}, 400),
        ("/api/generate", {"model": "m", "prompt": CANARY, CANARY: 1}, 400),
    ]
    with caplog.at_level(logging.DEBUG):
        for i, (path, body, status) in enumerate(sent):
            r = app.client.post(path, json=body, headers={"x-request-id": f"o-{i}"})
            assert r.status_code == status, r.text
            assert all(c not in r.text for c in CANARIES) or status == 200
        app.client.get("/api/tags")  # a listing: not an inference, not audited
    records = app.records()
    assert [r["request_id"] for r in records] == [f"o-{i}" for i in range(len(sent))]
    assert [r["status"] for r in records] == [s for _, _, s in sent]
    assert all(r["route"] in ("/api/chat", "/api/generate") for r in records)
    assert records[0]["prompt_tokens"] and records[0]["completion_tokens"] == len(REPLY.split())
    audit_text = "".join(f.read_text() for f in log_files(app.home / "audit"))
    for canary in CANARIES:
        assert canary not in caplog.text and canary not in audit_text


# -- the official client on the real model -------------------------------------


@dataclass
class Served:
    """A real server on the real model, with its own home (and so its own audit log)."""

    server: ServerProcess
    home: Path

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self.server.url


@pytest.fixture(scope="module")
def served(gemma_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("ollama") / "home"  # hard links: no copy of the model
    shutil.copytree(gemma_home, home, copy_function=os.link)
    flags = ("--parallel", "2", "--ctx-size", "1024", "--embeddings", "--embeddings-ctx", "64")
    with start_server(home, *flags) as server:
        yield Served(server, home)


@pytest.mark.model
def test_official_client_chat_generate_stream_list_show_ps(served: Served) -> None:
    import ollama

    client = ollama.Client(host=served.url)
    names = {m.model for m in client.list().models}
    assert {"gemma3-270m", "gemma3-270m:1"} <= names
    listed = next(m for m in client.list().models if m.model == "gemma3-270m:1")
    assert listed.size == 253_113_024 and listed.details is not None
    assert listed.details.family == "gemma3" and listed.details.quantization_level == "Q4_K_M"
    shown = client.show("gemma3-270m")
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "gemma3"
    assert "num_ctx 1024" in (shown.parameters or "")
    assert {m.model for m in client.ps().models} >= {"gemma3-270m"}

    options = {"temperature": 0, "num_predict": 12}
    reply = client.chat("gemma3-270m", [{"role": "user", "content": "What is the capital of France?"}], options=options)
    assert reply.message.role == "assistant" and reply.message.content and reply.done
    assert reply.done_reason in ("stop", "length") and reply.eval_count and reply.eval_count <= 12
    assert reply.prompt_eval_count and reply.total_duration and reply.total_duration > 0
    parts = list(
        client.chat(
            "gemma3-270m:latest",
            [{"role": "user", "content": "What is the capital of France?"}],
            options=options,
            stream=True,
        )
    )
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts) == reply.message.content  # greedy: same text

    gen = client.generate("gemma3-270m", "The heart has four", options={"temperature": 0, "num_predict": 6})
    assert gen.response and gen.done and gen.eval_count == 6 and gen.done_reason == "length"
    streamed = list(client.generate("gemma3-270m", "The heart has four", options=options, stream=True))
    assert streamed[-1].done and "".join(p.response or "" for p in streamed)


@pytest.mark.model
def test_official_client_format_gets_json_matching_the_schema(served: Served) -> None:
    import ollama

    client = ollama.Client(host=served.url)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "sure": {"type": "boolean"}},
        "required": ["city", "sure"],
        "additionalProperties": False,
    }
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    for seed in (1, 2, 3):  # sampled, not greedy: the grammar, not luck, keeps it valid
        options = {"temperature": 1.0, "seed": seed, "num_predict": 96}
        reply = client.chat("gemma3-270m", ask, format=schema, options=options)
        assert reply.done_reason == "stop"  # the schema bounds the output: it closes well before 96 tokens
        answer = json.loads(reply.message.content or "")
        assert set(answer) == {"city", "sure"} and isinstance(answer["sure"], bool) and len(answer["city"]) <= 20
    # "json": any object. Unbounded, so it may be cut at num_predict; it starts as one all the same.
    gen = client.generate("gemma3-270m", "Name a colour.", format="json", options={"temperature": 0, "num_predict": 32})
    assert (gen.response or "").lstrip().startswith("{")
    if gen.done_reason == "stop":
        assert isinstance(json.loads(gen.response or ""), dict)


@pytest.mark.model
def test_official_client_embed(served: Served) -> None:
    import ollama

    client = ollama.Client(host=served.url)
    texts = ["The patient has chest pain.", "The patient reports pain in the chest.", "Parking is on level two."]
    result = client.embed("gemma3-270m", texts)
    vectors = [list(v) for v in result.embeddings]
    assert len(vectors) == 3 and len({len(v) for v in vectors}) == 1 and len(vectors[0]) >= 64
    assert all(abs(sum(x * x for x in v) - 1) < 1e-3 for v in vectors)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    assert result.prompt_eval_count and result.prompt_eval_count > 3
    legacy = client.embeddings("gemma3-270m", texts[0])
    assert cos(list(legacy.embedding), vectors[0]) > 0.999
    with pytest.raises(ollama.ResponseError) as too_long:
        client.embed("gemma3-270m", "word " * 200)
    assert too_long.value.status_code == 400


@pytest.mark.model
def test_official_client_sees_errors_and_refusals(served: Served) -> None:
    import ollama

    client = ollama.Client(host=served.url)
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat("no-such-model", [{"role": "user", "content": "Hi"}])
    assert missing.value.status_code == 404 and "not found" in missing.value.error
    with pytest.raises(ollama.ResponseError) as pulled:
        client.pull("gemma3-270m")
    assert pulled.value.status_code == 403 and "mlserve pull" in pulled.value.error
    with pytest.raises(ollama.ResponseError) as option:
        client.chat("gemma3-270m", [{"role": "user", "content": "Hi"}], options={"mirostat": 2})
    assert option.value.status_code == 400 and "mirostat" in option.value.error
    with pytest.raises(ollama.ResponseError) as ctx:
        client.generate("gemma3-270m", "Hi", options={"num_ctx": 4096})
    assert ctx.value.status_code == 400 and "1024" in ctx.value.error


@pytest.mark.model
def test_canary_never_in_server_log_and_one_record_each(served: Served) -> None:
    import ollama

    client = ollama.Client(host=served.url, headers={"x-request-id": "ollama-canary"})
    client.chat("gemma3-270m", [{"role": "user", "content": CANARY}], options={"num_predict": 2})
    list(client.generate("gemma3-270m", CANARY, options={"num_predict": 2}, stream=True))
    with pytest.raises(ollama.ResponseError):
        client.generate(CANARY, CANARY)
    audit = served.home / "audit"

    def mine() -> list[dict[str, Any]]:
        return [
            rec
            for f in sorted(audit.glob("*.jsonl"))
            for rec in map(json.loads, f.read_text().splitlines())
            if rec.get("request_id") == "ollama-canary"
        ]

    _wait_for(lambda: len(mine()) >= 3)
    assert [r["status"] for r in mine()] == [200, 200, 404]
    text = "".join(f.read_text() for f in audit.glob("*.jsonl"))
    for canary in CANARIES:
        assert canary not in served.server.log and canary not in text


def _wait_for(predicate: Any, timeout: float = 10) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")
