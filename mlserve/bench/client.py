"""The HTTP side of a benchmark: streamed OpenAI requests timed per token, over pooled keep-alive clients.

Per-request work is kept lean: SSE lines are classified with one regex search, and only
the final usage chunk (and error events) are parsed as JSON.
"""

from __future__ import annotations

import itertools
import json
import re
from time import perf_counter
from typing import Any

import httpx

from mlserve.bench.metrics import RequestResult
from mlserve.errors import MlserveError

# A streamed chunk that carries text: "content" (chat) or "text" (completions) with a non-empty value.
_TOKEN = re.compile(rb'"(?:content|text)": ?"[^"]')
# httpx's connection pool slows down as it grows (each request scans every connection),
# so large concurrency is spread over several small clients; measured in benchmarks/bench_overhead.py.
CONNECTIONS_PER_CLIENT = 8


class ClientPool:
    """Keep-alive HTTP/1.1 connections to one server, sized to the concurrency."""

    def __init__(self, connections: int, timeout: float, api_key: str | None = None) -> None:
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.headers = headers
        n_clients = max(1, -(-connections // CONNECTIONS_PER_CLIENT))
        per = min(connections, CONNECTIONS_PER_CLIENT) if connections > 0 else 1
        limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
        self.clients = [
            httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)))
            for _ in range(n_clients)
        ]
        self._next = itertools.cycle(self.clients)

    def pick(self) -> httpx.AsyncClient:
        """The next client, round robin."""
        return next(self._next)

    async def aclose(self) -> None:
        """Close every connection."""
        for client in self.clients:
            await client.aclose()


def _error_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("error")
        return str(message or raw[:200].decode(errors="replace"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return raw[:200].decode(errors="replace").strip() or "no body"


async def send(client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]) -> RequestResult:
    """POST one streaming request; time the first token, every gap, and the last byte."""
    start = perf_counter()
    ttft = 0.0
    last = 0.0
    itl: list[float] = []
    usage: dict[str, Any] | None = None
    n_chunks = 0
    done = False
    try:
        async with client.stream("POST", url, content=body, headers=headers) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                return RequestResult(
                    False, perf_counter() - start, error=f"HTTP {resp.status_code}: {_error_message(raw)}"
                )
            buf = b""
            async for data in resp.aiter_bytes():
                now = perf_counter()
                buf += data
                lines = buf.split(b"\n")
                buf = lines.pop()
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    if _TOKEN.search(line):
                        if n_chunks:
                            itl.append(now - last)
                        else:
                            ttft = now - start
                        last = now
                        n_chunks += 1
                    if b'"usage":{' in line or b'"usage": {' in line:
                        usage = json.loads(line[5:])["usage"]
                    elif line.startswith((b'data: {"error"', b'data:{"error"')):
                        return RequestResult(False, perf_counter() - start, error=_error_message(line[5:]))
                    elif line.rstrip() in (b"data: [DONE]", b"data:[DONE]"):
                        done = True
    except httpx.HTTPError as exc:
        return RequestResult(False, perf_counter() - start, error=f"{type(exc).__name__}: {exc}".rstrip(": "))
    e2el = perf_counter() - start
    if not done:
        return RequestResult(False, e2el, error="the stream ended without data: [DONE]")
    if not n_chunks:
        ttft = e2el
    if usage is not None:
        return RequestResult(
            True, e2el, ttft, itl, int(usage.get("prompt_tokens") or 0), int(usage["completion_tokens"])
        )
    return RequestResult(True, e2el, ttft, itl, 0, n_chunks)


async def list_models(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> list[dict[str, Any]]:
    """GET /v1/models: the server's model entries."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            resp = await client.get(base_url + "/v1/models", headers=headers)
    except httpx.HTTPError as exc:
        raise MlserveError(
            f"Cannot reach {base_url}: {type(exc).__name__} {exc}.".replace(" .", "."),
            "Check the URL and that the server is running (`mlserve health URL`).",
        ) from None
    if resp.status_code != 200:
        raise MlserveError(
            f"GET {base_url}/v1/models answered HTTP {resp.status_code}: {_error_message(resp.content)}",
            "Pass --model NAME, or --api-key if the server needs one.",
        )
    data = resp.json().get("data") or []
    return [m for m in data if isinstance(m, dict) and m.get("id")]
