"""Embeddings: /v1/embeddings in OpenAI's shape, the batching thread, and the real model end to end.

Route tests run in-process on the fake engine; the batching thread runs on a fake pooling
context; the llama.cpp engine runs on the tiny GGUF (milliseconds) and, for what only a
trained model can show (paraphrases lie closer than unrelated sentences), on Gemma 3 270M.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import math
import re
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from mlserve.engine.api import GenerationFailed, InvalidRequest, Overloaded, StepStats
from mlserve.engine.embedding import EmbedWorker
from mlserve.engine.fake import FakeEngine
from mlserve.engine.llama.config import EngineConfig
from mlserve.engine.llama.engine import LlamaEngine
from mlserve.security.audit import log_files
from mlserve.security.keys import KeyStore, keys_path
from mlserve.server.app import create_app
from mlserve.server.settings import ServerSettings
from mlserve.server.state import ServedModel
from tests.support.servers import start_server

EMBED = {"model": "m", "input": ["The patient has a fever.", "Discharged home today."]}


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


@pytest.fixture
def fake(home: Path) -> Iterator[tuple[TestClient, FakeEngine]]:
    engine = FakeEngine("m:1")
    model = ServedModel("m", "1", "sha256:" + "ab" * 32, engine)
    settings = ServerSettings(audit_dir=str(home / "audit"), keys_file=str(keys_path(home)))
    with TestClient(create_app([model], settings)) as client:
        yield client, engine


def _records(home: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in log_files(home / "audit") for line in f.read_text().splitlines()]


# -- the OpenAI route on the fake engine ------------------------------------------------
def test_embeddings_answer_in_openai_shape(fake: tuple[TestClient, FakeEngine]) -> None:
    client, _ = fake
    r = client.post("/v1/embeddings", json=EMBED)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "m:1"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 64 for d in body["data"])
    assert all(abs(_norm(d["embedding"]) - 1) < 1e-9 for d in body["data"])
    n_tokens = sum(len(t.encode()) + 1 for t in EMBED["input"])  # the fake: BOS + one token per byte
    assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    assert r.headers["x-mlserve-model"] == "m:1" and r.headers["x-request-id"]
    one = client.post("/v1/embeddings", json={"model": "m", "input": EMBED["input"][0], "user": "u1"}).json()
    assert one["data"][0]["embedding"] == body["data"][0]["embedding"]  # a string is a list of one


def test_base64_is_little_endian_float32(fake: tuple[TestClient, FakeEngine]) -> None:
    client, _ = fake
    floats = client.post("/v1/embeddings", json=EMBED).json()["data"]
    packed = client.post("/v1/embeddings", json={**EMBED, "encoding_format": "base64"}).json()["data"]
    for f, p in zip(floats, packed, strict=True):
        raw = base64.b64decode(p["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert len(decoded) == len(f["embedding"])
        assert all(abs(a - b) < 1e-6 for a, b in zip(decoded, f["embedding"], strict=True))


def test_dimensions_shortens_and_renormalises(fake: tuple[TestClient, FakeEngine]) -> None:
    client, _ = fake
    full = client.post("/v1/embeddings", json=EMBED).json()["data"][0]["embedding"]
    short = client.post("/v1/embeddings", json={**EMBED, "dimensions": 8}).json()["data"][0]["embedding"]
    assert len(short) == 8 and abs(_norm(short) - 1) < 1e-9
    scale = _norm(full[:8])
    assert all(abs(s - f / scale) < 1e-12 for s, f in zip(short, full[:8], strict=True))
    r = client.post("/v1/embeddings", json={**EMBED, "dimensions": 65})
    assert r.status_code == 400 and "dimensions is 65" in r.json()["error"]["message"]
    assert client.post("/v1/embeddings", json={**EMBED, "dimensions": 0}).status_code == 400


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": "m", "input": [1, 2, 3]}, "check_embedding_ctx_length=False"),
        ({"model": "m", "input": [[1, 2], [3]]}, "Token-id input is not supported"),
        ({"model": "m", "input": []}, "at least one text"),
        ({"model": "m", "input": ["fine", ""]}, "empty text"),
        ({"model": "m", "input": ["x"] * 2049}, "at most 2048"),
        ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "m", "input": "x", "truncate": True}, "not supported"),
        ({"model": "m"}, "input"),
    ],
)
def test_bad_bodies_are_400_naming_the_problem(fake: tuple[TestClient, FakeEngine], body: Any, words: str) -> None:
    client, _ = fake
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert words in r.json()["error"]["message"]


def test_unknown_model_is_404_in_openai_shape(fake: tuple[TestClient, FakeEngine]) -> None:
    client, _ = fake
    r = client.post("/v1/embeddings", json={**EMBED, "model": "nope"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


def test_input_longer_than_the_context_is_400_never_cut(fake: tuple[TestClient, FakeEngine]) -> None:
    client, engine = fake
    r = client.post("/v1/embeddings", json={"model": "m", "input": ["short", "x" * 600]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "Input 1 has 601 tokens" in error["message"] and "512" in error["message"]


def test_model_not_served_with_embeddings_is_400(fake: tuple[TestClient, FakeEngine]) -> None:
    client, engine = fake
    engine.script.embeddings = False
    r = client.post("/v1/embeddings", json=EMBED)
    assert r.status_code == 400
    assert "not served with embeddings" in r.json()["error"]["message"]


def test_one_audit_record_per_request_without_text(home: Path, fake: tuple[TestClient, FakeEngine]) -> None:
    client, _ = fake
    secret = "Jane Roe, MRN 4471, HIV positive"
    assert client.post("/v1/embeddings", json={"model": "m", "input": [secret]}).status_code == 200
    assert client.post("/v1/embeddings", json={"model": "nope", "input": [secret]}).status_code == 404
    client.__exit__(None, None, None)  # lifespan end flushes the audit writer
    records = _records(home)
    assert [(r["route"], r["status"]) for r in records] == [("/v1/embeddings", 200), ("/v1/embeddings", 404)]
    assert records[0]["prompt_tokens"] == len(secret.encode()) + 1 and records[0]["version"] == "1"
    assert re.fullmatch(r"[0-9a-f]{64}", records[0]["prompt_sha256"])
    assert all("Jane" not in f.read_text() for f in log_files(home / "audit"))


def test_keys_and_scopes_hold(home: Path) -> None:
    store = KeyStore(home)
    metrics_key = store.create("scraper", ["metrics"])[1]
    infer_key = store.create("client", ["infer"])[1]
    model = ServedModel("m", "1", "sha256:" + "ab" * 32, FakeEngine("m:1"))
    settings = ServerSettings(audit_dir=str(home / "audit"), keys_file=str(keys_path(home)))
    with TestClient(create_app([model], settings)) as client:
        assert client.post("/v1/embeddings", json=EMBED).status_code == 401
        r = client.post("/v1/embeddings", json=EMBED, headers={"Authorization": f"Bearer {metrics_key}"})
        assert r.status_code == 403
        r = client.post("/v1/embeddings", json=EMBED, headers={"Authorization": f"Bearer {infer_key}"})
        assert r.status_code == 200


def test_batch_metric_is_exported(fake: tuple[TestClient, FakeEngine]) -> None:
    client, _ = fake
    assert client.post("/v1/embeddings", json={"model": "m", "input": [f"note {i}" for i in range(32)]}).is_success
    text = client.get("/metrics").text
    assert 'mlserve_embedding_batch_inputs_count{model="m:1"} 1.0' in text
    assert 'mlserve_embedding_batch_inputs_bucket{le="16",model="m:1"} 0.0' in text
    assert 'mlserve_embedding_batch_inputs_bucket{le="32",model="m:1"} 1.0' in text
    assert 'mlserve_embedding_batch_inputs_sum{model="m:1"} 32.0' in text


# -- the batching thread on a fake pooling context ----------------------------------------
class _Pool:
    """A pooling context that records each decode's inputs; ``gate`` holds a decode open."""

    def __init__(self, n_batch: int = 64, n_seq: int = 4, fail_on: int | None = None) -> None:
        self.n_batch, self.n_seq, self.fail_on = n_batch, n_seq, fail_on
        self.calls: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def embed(self, inputs: list[list[int]]) -> list[Any]:
        self.entered.set()
        self.gate.wait(10)
        self.calls.append(inputs)
        if self.fail_on is not None and any(self.fail_on in t for t in inputs):
            raise GenerationFailed("scripted decode failure")
        return [[float(sum(t)), float(len(t))] for t in inputs]

    def close(self) -> None:
        pass


def test_worker_packs_inputs_of_several_requests_into_one_decode() -> None:
    pool, stats = _Pool(), StepStats()
    worker = EmbedWorker(pool, stats)
    pool.gate.clear()
    worker.start()
    try:
        first = worker.submit([[1]])  # occupies the thread while the others queue
        assert pool.entered.wait(5)
        a = worker.submit([[2, 2], [3]])
        b = worker.submit([[4]])
        pool.gate.set()
        assert b.result(5)[0] == pytest.approx([4 / math.sqrt(17), 1 / math.sqrt(17)])  # (sum, len) normalised
        assert a.result(5)[0] == pytest.approx([4 / math.sqrt(20), 2 / math.sqrt(20)])
        assert first.result(5)
    finally:
        worker.stop()
    assert pool.calls == [[[1]], [[2, 2], [3], [4]]]
    assert (stats.embed_decodes, stats.embed_inputs) == (2, 4)


def test_worker_splits_at_sequence_and_token_limits() -> None:
    pool = _Pool(n_batch=10, n_seq=3)
    worker = EmbedWorker(pool, StepStats())
    worker.start()
    try:
        worker.submit([[1] * 4, [1] * 4, [1] * 4, [1], [1], [1], [1]]).result(5)
    finally:
        worker.stop()
    assert [[len(t) for t in call] for call in pool.calls] == [[4, 4], [4, 1, 1], [1, 1]]


def test_worker_failure_fails_only_that_decode() -> None:
    pool = _Pool(n_seq=1, fail_on=9)
    worker = EmbedWorker(pool, StepStats())
    worker.start()
    try:
        bad = worker.submit([[9], [1]])
        good = worker.submit([[2]])
        with pytest.raises(GenerationFailed):
            bad.result(5)
        assert good.result(5) == [[pytest.approx(2 / math.sqrt(5)), pytest.approx(1 / math.sqrt(5))]]
    finally:
        worker.stop()
    assert [1] not in [t for call in pool.calls for t in call]  # the failed request's rest was dropped


def test_worker_bounds_its_queue_and_refuses_after_stop() -> None:
    pool = _Pool()
    pool.gate.clear()
    worker = EmbedWorker(pool, StepStats(), max_queued=3)
    worker.start()
    worker.submit([[1]])
    assert pool.entered.wait(5)
    waiting = worker.submit([[1], [2]])
    with pytest.raises(Overloaded):
        worker.submit([[1], [2]])
    pool.gate.set()
    worker.stop()
    with pytest.raises(Exception):  # noqa: B017 - Unavailable or the result: either way it ended
        waiting.result(5)
    with pytest.raises(Exception, match="unloaded"):
        worker.submit([[1]])


# -- the llama.cpp engine on the tiny GGUF -------------------------------------------------
def test_llama_engine_without_embeddings_refuses(tiny_gguf: Path) -> None:
    async def run() -> None:
        engine = LlamaEngine(EngineConfig(tiny_gguf, "tiny:1", ctx_size=64, parallel=1, threads=1))
        await engine.start()
        try:
            with pytest.raises(InvalidRequest, match="not served with embeddings"):
                await engine.embed(["hello"])
        finally:
            await engine.close()

    asyncio.run(run())


def test_llama_engine_batches_and_refuses_long_inputs(tiny_gguf: Path) -> None:
    config = EngineConfig(tiny_gguf, "tiny:1", ctx_size=64, parallel=1, threads=1, embeddings=True, embeddings_ctx=512)
    asyncio.run(_batches_and_refuses(LlamaEngine(config)))


async def _batches_and_refuses(engine: LlamaEngine) -> None:
    await engine.start()
    try:
        stats = engine.stats()
        assert stats is not None and stats.embed_decodes == 1  # the warm-up
        texts = [f"note {i}" for i in range(32)]
        vectors, tokens = await engine.embed(texts)
        assert tokens <= 512  # so one decode can hold them all
        assert len(vectors) == 32 and all(abs(_norm(v) - 1) < 1e-6 for v in vectors)
        assert (stats.embed_decodes, stats.embed_inputs) == (2, 33)  # 32 inputs, one decode
        alone, _ = await engine.embed(texts[3:4])
        assert _cos(alone[0], vectors[3]) > 0.999  # a sequence never sees its batch neighbours
        with pytest.raises(InvalidRequest, match="Input 1 has .* tokens but the embeddings context holds 512"):
            await engine.embed(["short", "word " * 600])
        assert stats.embed_decodes == 3  # refused before anything was decoded
    finally:
        await engine.close()


# -- the real model, end to end ---------------------------------------------------------
PARAPHRASES = (
    "The patient reports chest pain that started two days ago.",
    "Two days ago the patient began having pain in the chest.",
)
UNRELATED = ("The patient reports chest pain that started two days ago.", "The invoice is due at the end of the month.")


@pytest.fixture(scope="module")
def gemma_embed(gemma_home: Path) -> Iterator[str]:
    flags = ("--embeddings", "--embeddings-ctx", "256", "--parallel", "1", "--ctx-size", "256")
    with start_server(gemma_home, *flags) as server:
        yield server.url


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf'^{re.escape(name)}{{model="gemma3-270m:1"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.model
def test_gemma_paraphrases_lie_closer_than_unrelated_sentences(gemma_embed: str) -> None:
    import openai

    client = openai.OpenAI(base_url=gemma_embed + "/v1", api_key="unused")
    para = client.embeddings.create(model="gemma3-270m", input=list(PARAPHRASES), encoding_format="float")
    other = client.embeddings.create(model="gemma3-270m", input=list(UNRELATED))  # the client's default: base64
    a, b = (d.embedding for d in para.data)
    c, d = (e.embedding for e in other.data)
    assert len(a) == 640 and abs(_norm(a) - 1) < 1e-5 and abs(_norm(c) - 1) < 1e-5
    assert _cos(a, c) > 0.9999  # the same sentence, float or base64
    assert _cos(a, b) > _cos(c, d) + 0.05, (_cos(a, b), _cos(c, d))
    assert para.usage.prompt_tokens == para.usage.total_tokens > 10


@pytest.mark.model
def test_gemma_32_inputs_are_one_engine_batch(gemma_embed: str) -> None:
    before = _metric(gemma_embed, "mlserve_embedding_batch_inputs_count")
    texts = [f"Note {i}." for i in range(32)]
    r = httpx.post(gemma_embed + "/v1/embeddings", json={"model": "gemma3-270m", "input": texts}, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 32
    assert r.json()["usage"]["prompt_tokens"] <= 256  # what one decode of --embeddings-ctx 256 holds
    assert _metric(gemma_embed, "mlserve_embedding_batch_inputs_count") == before + 1
    buckets = httpx.get(gemma_embed + "/metrics", timeout=10).text
    assert re.search(r'mlserve_embedding_batch_inputs_bucket\{le="32",model="gemma3-270m:1"\} [1-9]', buckets)


@pytest.mark.model
def test_gemma_input_longer_than_the_context_is_400(gemma_embed: str) -> None:
    long_note = "The patient was seen on the ward today. " * 40  # ~360 tokens against --embeddings-ctx 256
    r = httpx.post(gemma_embed + "/v1/embeddings", json={"model": "gemma3-270m", "input": long_note}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "embeddings context holds 256" in r.json()["error"]["message"]


@pytest.mark.model
def test_gemma_concurrent_requests_share_decodes(gemma_embed: str) -> None:
    before = _metric(gemma_embed, "mlserve_embedding_batch_inputs_count")
    inputs_before = _metric(gemma_embed, "mlserve_embedding_batch_inputs_sum")

    def one(i: int) -> int:
        body = {"model": "gemma3-270m", "input": [f"Follow-up visit {i}, wound healing well."] * 2}
        return httpx.post(gemma_embed + "/v1/embeddings", json=body, timeout=120).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [200] * 8
    assert _metric(gemma_embed, "mlserve_embedding_batch_inputs_sum") == inputs_before + 16
    assert _metric(gemma_embed, "mlserve_embedding_batch_inputs_count") - before < 8  # some shared a decode
