"""The HTTP side of a benchmark: streamed requests timed per token, over pooled keep-alive clients.

The protocol (OpenAI, Ollama, Anthropic) only changes how a line is read (``bench/apis.py``);
timing is the same for all. Per-request work is kept lean: OpenAI's SSE lines are classified
with one regex search, and only the final usage chunk (and error events) are parsed as JSON.
"""

from __future__ import annotations

import itertools
from time import perf_counter
from typing import Any

import httpx

from mlserve.bench.apis import APIS, Api, error_message
from mlserve.bench.metrics import RequestResult
from mlserve.errors import MlserveError

# httpx's connection pool slows down as it grows (each request scans every connection),
# so large concurrency is spread over several small clients; measured in benchmarks/bench_overhead.py.
CONNECTIONS_PER_CLIENT = 8


class ClientPool:
    """Keep-alive HTTP/1.1 connections to one server, sized to the concurrency."""

    def __init__(self, connections: int, timeout: float, api_key: str | None = None, api: Api = APIS["openai"]) -> None:
        self.api = api
        self.headers = api.headers(api_key)
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


async def send(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str], api: Api = APIS["openai"]
) -> RequestResult:
    """POST one streaming request; time the first token, every gap, and the last byte."""
    start = perf_counter()
    ttft = 0.0
    last = 0.0
    itl: list[float] = []
    n_chunks = 0
    decoder = api.decoder()
    try:
        async with client.stream("POST", url, content=body, headers=headers) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                return RequestResult(
                    False, perf_counter() - start, error=f"HTTP {resp.status_code}: {error_message(raw)}"
                )
            buf = b""
            async for data in resp.aiter_bytes():
                now = perf_counter()
                buf += data
                lines = buf.split(b"\n")
                buf = lines.pop()
                for line in lines:
                    if decoder.feed(line):
                        if n_chunks:
                            itl.append(now - last)
                        else:
                            ttft = now - start
                        last = now
                        n_chunks += 1
                    if decoder.error is not None:
                        return RequestResult(False, perf_counter() - start, error=decoder.error)
            if buf:
                decoder.feed(buf)  # NDJSON's last line may end without a newline
    except httpx.HTTPError as exc:
        return RequestResult(False, perf_counter() - start, error=f"{type(exc).__name__}: {exc}".rstrip(": "))
    except (ValueError, KeyError, TypeError, AttributeError):  # a line that is not what the protocol says
        return RequestResult(False, perf_counter() - start, error=f"a malformed {api.name} stream line")
    e2el = perf_counter() - start
    if decoder.error is not None:
        return RequestResult(False, e2el, error=decoder.error)
    if not decoder.done:
        return RequestResult(False, e2el, error=f"the stream ended without {api.end_marker}")
    if not n_chunks:
        ttft = e2el
    if decoder.output_tokens is not None:
        return RequestResult(True, e2el, ttft, itl, decoder.prompt_tokens or 0, decoder.output_tokens)
    return RequestResult(True, e2el, ttft, itl, decoder.prompt_tokens or 0, n_chunks)


async def list_models(
    base_url: str, api_key: str | None = None, timeout: float = 30.0, api: Api = APIS["openai"]
) -> list[dict[str, Any]]:
    """GET /v1/models (which mlserve, Ollama and Anthropic all serve): the server's model entries."""
    headers = api.headers(api_key)
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
            f"GET {base_url}/v1/models answered HTTP {resp.status_code}: {error_message(resp.content)}",
            "Pass --model NAME, or --api-key if the server needs one.",
        )
    data = resp.json().get("data") or []
    return [m for m in data if isinstance(m, dict) and m.get("id")]
