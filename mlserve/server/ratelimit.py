"""Per-key (or, keyless, per-client-address) token buckets: N requests per minute, bursts up to N."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

MAX_BUCKETS = 10_000


class RateLimiter:
    """One token bucket per principal; ``per_minute`` 0 turns limiting off."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, at)

    def check(self, principal: str) -> int | None:
        """Take a token; ``None`` when allowed, else the seconds to wait (for ``Retry-After``)."""
        if self.capacity <= 0:
            return None
        now = self._clock()
        tokens, at = self._buckets.get(principal, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._store(principal, tokens - 1.0, now)
            return None
        self._store(principal, tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate))

    def _store(self, principal: str, tokens: float, now: float) -> None:
        if principal not in self._buckets and len(self._buckets) >= MAX_BUCKETS:
            # Bound memory against many client addresses: drop buckets that have refilled.
            full = [p for p, (t, a) in self._buckets.items() if t + (now - a) * self.rate >= self.capacity]
            for p in full:
                del self._buckets[p]
        self._buckets[principal] = (tokens, now)
