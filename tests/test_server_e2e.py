"""End to end: real uvicorn, the real Gemma model, real HTTP clients."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.servers import ServerProcess, start_server

pytestmark = pytest.mark.model

CANARY = "Jane Canary-Doe MRN 00417733 SSN 123-45-6789"


@pytest.fixture(scope="module")
def server(gemma_home: Path) -> Iterator[ServerProcess]:
    with start_server(gemma_home, "--parallel", "8", "--ctx-size", "1024") as server:
        yield server


def _chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": "gemma3-270m", "messages": [{"role": "user", "content": text}], **extra}


def test_stream_arrives_token_by_token(server: ServerProcess) -> None:
    arrivals: list[tuple[float, dict[str, object]]] = []
    body = _chat("Tell me about the ocean.", stream=True, max_tokens=48, temperature=0)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-mlserve-model"] == "gemma3-270m:1"
        assert resp.headers["x-request-id"]
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append((time.monotonic(), json.loads(line[6:])))
            elif line == "data: [DONE]":
                done_at = time.monotonic()
    content = [(t, c) for t, c in arrivals if c["choices"] and c["choices"][0]["delta"].get("content")]  # type: ignore[index]
    assert len(content) >= 10
    # The first token reached us well before the last one was generated.
    assert content[-1][0] - content[0][0] > 0.05
    assert done_at >= content[-1][0]
    final = [c for _, c in arrivals if c["choices"] and c["choices"][0]["finish_reason"]]  # type: ignore[index]
    assert final and final[-1]["choices"][0]["finish_reason"] in ("stop", "length")  # type: ignore[index]


def test_openai_client_unchanged(server: ServerProcess) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    models = [m.id for m in client.models.list()]
    assert "gemma3-270m" in models and "gemma3-270m:1" in models
    chat = client.chat.completions.create(
        model="gemma3-270m", messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens <= 12 and chat.usage.prompt_tokens > 0
    assert chat.choices[0].finish_reason in ("stop", "length")
    comp = client.completions.create(model="gemma3-270m:1", prompt="The heart has four", max_tokens=8, temperature=0)
    assert comp.usage is not None and comp.usage.completion_tokens == 8
    assert comp.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model="gemma3-270m",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 10
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text


def test_greedy_is_reproducible(server: ServerProcess) -> None:
    body = {"model": "gemma3-270m", "prompt": "The patient was admitted with", "max_tokens": 24, "temperature": 0}
    first = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    second = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["choices"][0]["text"].strip()


def test_stop_sequence_ends_generation(server: ServerProcess) -> None:
    body = {"model": "gemma3-270m", "prompt": "1, 2, 3, 4,", "max_tokens": 40, "temperature": 0}
    free = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    # Stop on a piece of text the free-running continuation contains.
    stop = free.strip()[2:5] or free[:3]
    stopped = httpx.post(server.url + "/v1/completions", json={**body, "stop": [stop]}, timeout=60).json()
    choice = stopped["choices"][0]
    assert stop not in choice["text"]
    assert choice["finish_reason"] == "stop"
    assert free.startswith(choice["text"])


def test_health_answers_fast_during_eight_streams(server: ServerProcess) -> None:
    body = _chat("Write a long story about a lighthouse.", stream=True, max_tokens=120)
    started = threading.Barrier(9)
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as resp:
                started.wait(30)
                for _ in resp.iter_raw(1 << 16):  # drain cheaply: this process is measuring latency
                    pass
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait(60)
    worst = 0.0
    with httpx.Client(base_url=server.url, timeout=5) as client:
        client.get("/health/live")
        for _ in range(20):
            for path in ("/health/live", "/health/ready"):
                t0 = time.perf_counter()
                resp = client.get(path)
                worst = max(worst, time.perf_counter() - t0)
                assert resp.status_code == 200
        metrics = client.get("/metrics").text
    for t in threads:
        t.join(120)
    assert not errors
    assert worst < 0.050, f"slowest health answer took {worst * 1000:.1f} ms"
    assert "mlserve_active_sequences" in metrics


def test_health_fast_while_4mib_prompt_is_tokenised(server: ServerProcess) -> None:
    """Reading, parsing, hashing and tokenising a 4 MiB prompt all happen off the event loop."""
    prompt = "The patient reports intermittent chest pain radiating to the left arm. " * 58_000
    body = json.dumps({"model": "gemma3-270m", "prompt": prompt[: (4 << 20) - 200], "max_tokens": 4}).encode()
    assert len(body) < 4 << 20
    answer: list[httpx.Response] = []
    sender = threading.Thread(
        target=lambda: answer.append(
            httpx.post(
                server.url + "/v1/completions", content=body, timeout=120, headers={"content-type": "application/json"}
            )
        )
    )
    latencies = []
    with httpx.Client(base_url=server.url, timeout=5) as client:
        client.get("/health/live")
        sender.start()
        while sender.is_alive():
            t0 = time.perf_counter()
            assert client.get("/health/live").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.005)
    sender.join()
    assert answer[0].status_code == 400 and "context" in answer[0].json()["error"]["message"]
    assert len(latencies) >= 10, "the prompt was handled too fast to measure anything"
    assert max(latencies) < 0.050, f"slowest health answer took {max(latencies) * 1000:.1f} ms"


def test_metrics_exposed_without_text(server: ServerProcess) -> None:
    httpx.post(server.url + "/v1/completions", json={"model": "gemma3-270m", "prompt": CANARY, "max_tokens": 4})
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "mlserve_requests_total",
        "mlserve_time_to_first_token_seconds_bucket",
        "mlserve_request_duration_seconds_bucket",
        "mlserve_queue_wait_seconds_bucket",
        "mlserve_prompt_tokens_total",
        "mlserve_generation_tokens_total",
        "mlserve_requests_in_flight",
        "mlserve_queue_depth",
        "mlserve_kv_cells_used",
        "mlserve_batch_tokens_total",
        'mlserve_batch_size_tokens_bucket{le="+Inf",model="gemma3-270m:1"}',
    ):
        assert name in text, name
    assert 'model="gemma3-270m:1"' in text
    assert "Canary" not in text and "123-45-6789" not in text


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "gemma3-270m", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "gemma3-270m", "prompt": "x", "n": 2}, 400, "'n'"),
        ({"model": "gemma3-270m", "prompt": "x", "logprobs": 5}, 400, "logprobs"),
        ({"model": "gemma3-270m", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"model": "gemma3-270m", "prompt": "x", "frobnicate": 1}, 400, "not supported"),
        ({"model": "gemma3-270m", "prompt": [2, 999_999_999]}, 400, "vocabulary"),
        ({"model": "gemma3-270m", "prompt": "lone \ud800 surrogate"}, 400, "Unicode"),
        ({"model": "no-such-model", "prompt": "x"}, 404, "not served"),
        ({"model": "gemma3-270m:99", "prompt": "x"}, 404, "not served"),
        ({"model": "gemma3-270m", "messages": []}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors(
    server: ServerProcess, body: dict[str, object], status: int, needle: str
) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    # json.dumps escapes a lone surrogate as \\ud800, as a browser or another language's client may send it.
    payload = json.dumps(body).encode()
    resp = httpx.post(server.url + path, content=payload, headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == status
    err = resp.json()["error"]
    assert needle in err["message"] and err["type"]
    assert "code" in err


def test_reused_request_id_does_not_cross_requests(server: ServerProcess) -> None:
    headers = {"x-request-id": "same-id"}
    long_body = {"model": "gemma3-270m", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**long_body, "stream": True}, headers=headers, timeout=30
    ) as resp:
        lines = resp.iter_lines()
        next(lines)
    # The first request was abandoned; a second one with the same id must still be served.
    short = {"model": "gemma3-270m", "prompt": "The patient", "max_tokens": 6, "temperature": 0}
    resp = httpx.post(server.url + "/v1/completions", json=short, headers=headers, timeout=30)
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "same-id"
    assert resp.json()["usage"]["completion_tokens"] == 6


def test_malformed_json_and_large_body(server: ServerProcess) -> None:
    resp = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=30)
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]
    big = {"model": "gemma3-270m", "prompt": "a" * (5 << 20)}
    resp = httpx.post(server.url + "/v1/completions", json=big, timeout=30)
    assert resp.status_code == 413


def test_prompt_longer_than_context_is_400_naming_both(server: ServerProcess) -> None:
    body = {"model": "gemma3-270m", "prompt": "word " * 3000, "max_tokens": 8}
    resp = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert resp.status_code == 400
    msg = resp.json()["error"]["message"]
    assert "1024" in msg and "tokens" in msg
    fits = {"model": "gemma3-270m", "prompt": "word " * 200, "max_tokens": 2000}
    resp = httpx.post(server.url + "/v1/completions", json=fits, timeout=30)
    assert resp.status_code == 400 and "max_tokens" in resp.json()["error"]["message"]


def test_no_prompt_text_in_logs(server: ServerProcess) -> None:
    httpx.post(server.url + "/v1/completions", json={"model": "gemma3-270m", "prompt": CANARY, "max_tokens": 4})
    httpx.post(server.url + "/v1/completions", json={"model": "gemma3-270m", "prompt": CANARY, "max_tokens": -4})
    httpx.post(server.url + "/v1/chat/completions", json=_chat(CANARY, max_tokens=3))
    httpx.post(server.url + "/v1/completions", json={"model": CANARY, "prompt": CANARY})
    assert "request " in server.log  # the per-request log line exists ...
    assert "Canary" not in server.log and "00417733" not in server.log and "123-45-6789" not in server.log


def test_queue_full_disconnect_and_deadline(gemma_home: Path) -> None:
    with start_server(gemma_home, "--parallel", "1", "--max-queue", "0", "--request-timeout", "3") as server:
        # Greedy "Once upon a time" runs past 1000 tokens without an end-of-turn on this model.
        long_body = {"model": "gemma3-270m", "prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0}
        long_body["stream"] = True
        with httpx.Client(base_url=server.url, timeout=30) as client:
            # One long stream holds the only slot.
            with client.stream("POST", "/v1/completions", json=long_body) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()
                next(lines)
                t0 = time.perf_counter()
                busy = client.post("/v1/completions", json={"model": "gemma3-270m", "prompt": "hi", "max_tokens": 2})
                elapsed = time.perf_counter() - t0
                assert busy.status_code == 503
                assert busy.headers.get("retry-after")
                assert elapsed < 0.100, f"503 took {elapsed * 1000:.0f} ms"
            # Leaving the block closed the connection: the generation stops within a token or so
            # (left alone it would run 3000 tokens, over 30 s here), and the next request is served.
            t0 = time.perf_counter()
            deadline = time.monotonic() + 10
            while 'mlserve_active_sequences{model="gemma3-270m:1"} 0.0' not in client.get("/metrics").text:
                assert time.monotonic() < deadline, "generation kept running after the client left"
            freed = time.perf_counter() - t0
            resp = client.post("/v1/completions", json={"model": "gemma3-270m", "prompt": "hi", "max_tokens": 2})
            assert resp.status_code == 200
            assert freed < 5.0, f"slot freed {freed:.2f} s after disconnect"
            # The deadline ends a long generation with 504 and frees the engine.
            t0 = time.perf_counter()
            resp = client.post("/v1/completions", json={**long_body, "stream": False})
            assert resp.status_code == 504
            assert 2.5 < time.perf_counter() - t0 < 8
            assert resp.json()["error"]["code"] == "deadline_exceeded"
            ok = client.post("/v1/completions", json={"model": "gemma3-270m", "prompt": "hi", "max_tokens": 2})
            assert ok.status_code == 200


def test_sigterm_drains_then_exits_zero(gemma_home: Path) -> None:
    server = ServerProcess(gemma_home, ["gemma3-270m"], "--parallel", "2")
    try:
        server.wait_ready()
        result: dict[str, object] = {}
        first_chunk = threading.Event()

        def long_stream() -> None:
            body = {"model": "gemma3-270m", "prompt": "Once upon a time", "max_tokens": 120, "temperature": 0}
            chunks = []
            with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(line[6:])
                        first_chunk.set()
            result["chunks"] = chunks

        t = threading.Thread(target=long_stream)
        t.start()
        assert first_chunk.wait(30)
        server.proc.send_signal(15)
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health/ready").status_code != 503:
            assert time.monotonic() < deadline
        refused = httpx.post(server.url + "/v1/completions", json={"model": "gemma3-270m", "prompt": "x"})
        assert refused.status_code == 503
        t.join(60)
        chunks = result["chunks"]
        assert isinstance(chunks, list) and chunks[-1] == "[DONE]"
        final = json.loads(chunks[-2])
        assert final["choices"][0]["finish_reason"] in ("length", "stop")
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
