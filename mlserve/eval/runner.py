"""Send each dialogue to a server as a chat request, streamed and timed; collect the note and its usage.

Requests are greedy and, unless told otherwise, deterministic (``"mlserve": {"deterministic":
true}``: decoded alone), so the scores of one bundle on one dataset do not depend on what else
the server was doing. Timings use the bench's ``RequestResult``, so the latency block of an eval
has the same keys and formulas as a bench level.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import httpx

from mlserve.bench.metrics import RequestResult
from mlserve.eval.dataset import Pair


@dataclass(frozen=True)
class Plan:
    """What to send where."""

    base_url: str
    model: str
    system: str
    max_tokens: int
    concurrency: int = 1
    deterministic: bool = True
    timeout: float = 600.0
    api_key: str | None = None


@dataclass(frozen=True)
class Answer:
    """One pair's outcome: timings, and the note when the request completed."""

    pair: Pair
    result: RequestResult
    text: str | None = None
    finish_reason: str | None = None

    @property
    def output_sha256(self) -> str | None:
        """sha256 of the note (the same hash the server's audit record holds)."""
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest() if self.text is not None else None


def request_body(plan: Plan, pair: Pair) -> dict[str, Any]:
    """The chat request for one dialogue: the task's system prompt, then the dialogue as the user turn."""
    body: dict[str, Any] = {
        "model": plan.model,
        "messages": [{"role": "system", "content": plan.system}, {"role": "user", "content": pair.dialogue}],
        "max_tokens": plan.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if plan.deterministic:
        body["mlserve"] = {"deterministic": True}
    return body


def _error(raw: bytes) -> str:
    try:
        err = json.loads(raw)["error"]
        return str(err["message"] if isinstance(err, dict) else err)
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace").strip() or "no body"


async def ask(client: httpx.AsyncClient, plan: Plan, pair: Pair) -> Answer:
    """Stream one request; its text, finish reason, token counts, TTFT, gaps and end-to-end time."""
    headers = {"authorization": f"Bearer {plan.api_key}"} if plan.api_key else {}
    start = perf_counter()
    parts: list[str] = []
    itl: list[float] = []
    ttft = last = 0.0
    usage: dict[str, Any] = {}
    finish: str | None = None
    done = False

    def failed(why: str) -> Answer:
        return Answer(pair, RequestResult(False, perf_counter() - start, error=why))

    try:
        url = plan.base_url + "/v1/chat/completions"
        async with client.stream("POST", url, json=request_body(plan, pair), headers=headers) as resp:
            if resp.status_code != 200:
                return failed(f"HTTP {resp.status_code}: {_error(await resp.aread())}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return failed(_error(data.encode()))
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    finish = choice.get("finish_reason") or finish
                    if text:
                        now = perf_counter()
                        if parts:
                            itl.append(now - last)
                        else:
                            ttft = now - start
                        last = now
                        parts.append(text)
    except (httpx.HTTPError, ValueError) as exc:
        return failed(f"{type(exc).__name__}: {exc}".rstrip(": "))
    e2el = perf_counter() - start
    if not done:
        return failed("the stream ended without data: [DONE]")
    n_out = int(usage.get("completion_tokens") or len(parts))
    result = RequestResult(True, e2el, ttft or e2el, itl, int(usage.get("prompt_tokens") or 0), n_out)
    return Answer(pair, result, "".join(parts), finish)


async def _run(plan: Plan, pairs: tuple[Pair, ...], done: Callable[[Answer], None]) -> list[Answer]:
    limits = httpx.Limits(max_connections=plan.concurrency, max_keepalive_connections=plan.concurrency)
    timeout = httpx.Timeout(plan.timeout, connect=min(plan.timeout, 30.0))
    gate = asyncio.Semaphore(plan.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one(pair: Pair) -> Answer:
            async with gate:
                answer = await ask(client, plan, pair)
            done(answer)
            return answer

        return list(await asyncio.gather(*(one(p) for p in pairs)))


def run(
    plan: Plan, pairs: tuple[Pair, ...], done: Callable[[Answer], None] | None = None
) -> tuple[list[Answer], float]:
    """Every pair's answer, in dataset order, and the wall time they took together (seconds)."""
    start = perf_counter()
    answers = asyncio.run(_run(plan, pairs, done or (lambda a: None)))
    return answers, perf_counter() - start
