"""Closed-loop (fixed concurrency) and open-loop (Poisson/gamma arrivals) load generation."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter

from mlserve.bench.client import ClientPool, send
from mlserve.bench.metrics import RequestResult

OnResult = Callable[[RequestResult], None]


@dataclass(frozen=True)
class Level:
    """One load level: a concurrency cap and/or a request rate (None: send as fast as the cap allows)."""

    concurrency: int | None
    rate: float | None = None

    @property
    def label(self) -> str:
        """Short human name, e.g. ``concurrency 4`` or ``rate 2/s``."""
        parts = []
        if self.rate is not None:
            parts.append(f"rate {self.rate:g}/s")
        if self.concurrency is not None:
            parts.append(f"concurrency {self.concurrency}")
        return ", ".join(parts)


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps between arrivals: gamma-distributed with mean 1/rate (burstiness 1 = Poisson), as vLLM."""
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(n)]


class LoadGenerator:
    """Sends prepared request bodies to one URL at the chosen level."""

    def __init__(self, pool: ClientPool, url: str) -> None:
        self.pool = pool
        self.url = url

    async def _one(self, body: bytes, on_result: OnResult | None) -> RequestResult:
        result = await send(self.pool.pick(), self.url, body, self.pool.headers, self.pool.api)
        if on_result is not None:
            on_result(result)
        return result

    async def closed(
        self, bodies: Sequence[bytes], concurrency: int, on_result: OnResult | None = None
    ) -> tuple[list[RequestResult], float]:
        """``concurrency`` workers, each sending its next request when the last one finished."""
        results: list[RequestResult] = []
        pending = iter(bodies)

        async def worker() -> None:
            for body in pending:
                results.append(await self._one(body, on_result))

        start = perf_counter()
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(bodies))))))
        return results, perf_counter() - start

    async def open(
        self,
        bodies: Sequence[bytes],
        rate: float,
        concurrency: int | None,
        burstiness: float,
        seed: int,
        on_result: OnResult | None = None,
    ) -> tuple[list[RequestResult], float]:
        """Requests arrive on a schedule, whatever the server's pace (at most ``concurrency`` in flight)."""
        gaps = arrival_gaps(len(bodies), rate, burstiness, seed)
        gate = asyncio.Semaphore(concurrency) if concurrency else None

        async def one(body: bytes) -> RequestResult:
            if gate is None:
                return await self._one(body, on_result)
            async with gate:
                return await self._one(body, on_result)

        tasks = []
        start = perf_counter()
        next_at = start
        for i, body in enumerate(bodies):
            if i:
                next_at += gaps[i]
                delay = next_at - perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(body)))
        results = list(await asyncio.gather(*tasks))
        return results, perf_counter() - start

    async def run(
        self, level: Level, bodies: Sequence[bytes], burstiness: float, seed: int, on_result: OnResult | None = None
    ) -> tuple[list[RequestResult], float]:
        """Run one level; return every request's result and the level's duration."""
        if level.rate is None:
            return await self.closed(bodies, level.concurrency or 1, on_result)
        return await self.open(bodies, level.rate, level.concurrency, burstiness, seed, on_result)
