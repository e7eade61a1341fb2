"""Shared pieces of the serving benchmarks: start servers, drive streamed requests, time them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from mlserve.bench.local_server import LocalServer, stop_process

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    """A server process and its base URL."""

    proc: subprocess.Popen[str]
    url: str

    def stop(self) -> None:
        """SIGTERM, then kill if it lingers."""
        stop_process(self.proc)


def _wait_ready(url: str, path: str, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server never became ready")


def start_mlserve(ref: str, *flags: str, src: Path | None = None) -> LocalServer:
    """`mlserve serve REF --port 0 FLAGS`, ready (the same launcher `mlserve bench REF` uses).

    ``src``: serve another mlserve source tree's code (a baseline), not this one's.
    """
    server = LocalServer(ref, list(flags), src=src)
    server.start()
    return server


def start_llama_server(binary: str, model: Path, parallel: int, ctx_per_seq: int, threads: int, port: int) -> Server:
    """llama.cpp's own server on loopback with the same model, slots and context per slot."""
    cmd = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel)]
    cmd += ["-c", str(ctx_per_seq * parallel), "-t", str(threads), "-tb", str(threads), "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, "/health", proc)
    return Server(proc, url)


@dataclass
class StreamResult:
    """Timing of one streamed completion."""

    tokens: int
    started: float
    first: float
    last: float


async def stream_completion(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int
) -> StreamResult:
    """One streamed /v1/completions request; token count from the server's usage."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = int(data["usage"]["completion_tokens"])
            if data.get("choices") and data["choices"][0].get("text"):
                first = first or now
                last = now
    return StreamResult(tokens, started, first, last)


def run(coro: object) -> object:
    """asyncio.run for scripts."""
    return asyncio.run(coro)  # type: ignore[arg-type]
