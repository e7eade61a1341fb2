"""Run a benchmark plan: warm up, then each level in turn, summarised with vLLM's metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlserve.bench.apis import APIS
from mlserve.bench.client import ClientPool
from mlserve.bench.loadgen import Level, LoadGenerator, OnResult
from mlserve.bench.metrics import summarize
from mlserve.bench.workload import Workload


@dataclass(frozen=True)
class Plan:
    """Everything one benchmark run needs."""

    base_url: str
    workload: Workload
    levels: Sequence[Level]
    warmup: int = 1
    burstiness: float = 1.0
    seed: int = 0
    slo: dict[str, float] = field(default_factory=dict)
    timeout: float = 600.0
    api_key: str | None = None
    api: str = "openai"  # the protocol the workload's bodies are written in (bench/apis.py)

    def connections(self) -> int:
        """Connections the pool needs: the largest concurrency (or every request, for an uncapped open loop)."""
        caps = [lv.concurrency if lv.concurrency else len(self.workload.bodies) for lv in self.levels]
        return max([1, *caps])


@dataclass
class Hooks:
    """Callbacks for progress display; all optional."""

    level_start: Callable[[Level, int], None] | None = None
    result: OnResult | None = None
    level_done: Callable[[Level, dict[str, Any]], None] | None = None


def salted(body: bytes, salt: str) -> bytes:
    """The body with ``salt`` put before its prompt (or system prompt, or first message), defeating prefix caches."""
    data = json.loads(body)
    if isinstance(data.get("system"), str):  # Anthropic: the system prompt comes first in the context
        data["system"] = salt + data["system"]
    elif isinstance(data.get("prompt"), str):
        data["prompt"] = salt + data["prompt"]
    elif data.get("messages") and isinstance(data["messages"][0].get("content"), str):
        data["messages"][0]["content"] = salt + data["messages"][0]["content"]
    return json.dumps(data).encode()


async def run_async(plan: Plan, hooks: Hooks | None = None) -> list[dict[str, Any]]:
    """Run every level of the plan; return one vLLM-style result dict per level."""
    hooks = hooks or Hooks()
    pool = ClientPool(plan.connections(), plan.timeout, plan.api_key, APIS[plan.api])
    gen = LoadGenerator(pool, plan.base_url + plan.workload.route)
    bodies = plan.workload.bodies
    out = []
    try:
        if plan.warmup and plan.levels:
            first = plan.levels[0].concurrency or 1
            warm = [salted(bodies[i % len(bodies)], "Warm-up. ") for i in range(plan.warmup)]
            await gen.closed(warm, first)
        for index, level in enumerate(plan.levels):
            if hooks.level_start:
                hooks.level_start(level, len(bodies))
            # Each level's prompts start differently, so no level times a prefix cached by the one before.
            if plan.workload.per_level:
                sent = plan.workload.per_level[index]
            else:
                sent = bodies if index == 0 else [salted(b, f"Run {index + 1}. ") for b in bodies]
            results, duration = await gen.run(level, sent, plan.burstiness, plan.seed, hooks.result)
            summary = summarize(
                results,
                duration,
                max_concurrency=level.concurrency,
                request_rate=level.rate,
                burstiness=plan.burstiness,
                slo=plan.slo,
            )
            if hooks.level_done:
                hooks.level_done(level, summary)
            out.append(summary)
    finally:
        await pool.aclose()
    return out


def run(plan: Plan, hooks: Hooks | None = None) -> list[dict[str, Any]]:
    """Synchronous wrapper of :func:`run_async`."""
    return asyncio.run(run_async(plan, hooks))


def levels_from(concurrency: Sequence[int], rates: Sequence[float]) -> list[Level]:
    """Closed-loop levels for each concurrency; with rates, open-loop levels (each capped by each concurrency)."""
    if not rates:
        return [Level(c) for c in concurrency] or [Level(1)]
    caps: Sequence[int | None] = concurrency or [None]
    return [Level(c, r) for r in rates for c in caps]
