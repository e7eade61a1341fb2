"""Per-request timings and the vLLM-compatible summary of one benchmark level."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mlserve.errors import UsageError

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
SLO_RE = re.compile(r"(ttft_ms|tpot_ms|itl_ms|e2el_ms)=([0-9]+(?:\.[0-9]*)?)")
DIGITS = 3  # JSON and tables show the same rounded numbers


@dataclass(slots=True)
class RequestResult:
    """What one request measured; times in seconds from when it was sent."""

    ok: bool
    e2el: float
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float:
        """(e2el - ttft) / (output tokens - 1); 0 for single-token outputs."""
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0

    def value_ms(self, metric: str) -> float:
        """This request's value of an SLO metric, in ms (itl_ms: its largest gap)."""
        if metric == "ttft_ms":
            return self.ttft * 1000
        if metric == "tpot_ms":
            return self.tpot * 1000
        if metric == "e2el_ms":
            return self.e2el * 1000
        return max(self.itl, default=0.0) * 1000


def parse_slo(items: Sequence[str]) -> dict[str, float]:
    """``["ttft_ms=500", "e2el_ms=20000,tpot_ms=50"]`` -> {metric: bound_ms}."""
    slo: dict[str, float] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            match = SLO_RE.fullmatch(part)
            if not match:
                raise UsageError(
                    f"Invalid SLO {part!r}.", f"Write KEY=MS with KEY one of {', '.join(METRICS)}, e.g. ttft_ms=500."
                )
            slo[match.group(1)] = float(match.group(2))
    return slo


def is_slo_term(text: str) -> bool:
    """Whether a word looks like an SLO term (``ttft_ms=500``)."""
    return all(SLO_RE.fullmatch(p.strip()) for p in text.split(",") if p.strip()) and "=" in text


def percentile(values: Sequence[float], q: float) -> float:
    """numpy's default (linear) percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def _stats(name: str, seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        f"mean_{name}": statistics.fmean(ms) if ms else 0.0,
        f"median_{name}": statistics.median(ms) if ms else 0.0,
        f"std_{name}": statistics.pstdev(ms) if len(ms) > 1 else 0.0,
        f"p99_{name}": percentile(ms, 99),
    }


def is_good(result: RequestResult, slo: dict[str, float]) -> bool:
    """A request is good when it completed and meets every SLO bound."""
    return result.ok and all(result.value_ms(k) <= bound for k, bound in slo.items())


def summarize(
    results: Sequence[RequestResult],
    duration: float,
    *,
    max_concurrency: int | None,
    request_rate: float | None,
    burstiness: float = 1.0,
    slo: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One level's result with vLLM's key names and formulas (request_rate "inf" for a closed loop)."""
    slo = slo or {}
    done = [r for r in results if r.ok]
    duration = max(duration, 1e-9)
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    good = sum(1 for r in done if is_good(r, slo))
    out: dict[str, Any] = {
        "max_concurrency": max_concurrency,
        "request_rate": "inf" if request_rate is None else request_rate,
        "burstiness": burstiness,
        "num_prompts": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "request_goodput": good / duration,
    }
    out.update(_stats("ttft_ms", [r.ttft for r in done]))
    out.update(_stats("tpot_ms", [r.tpot for r in done if r.output_tokens > 1]))
    gaps = [gap for r in done for gap in r.itl]
    out.update(_stats("itl_ms", gaps))
    out["max_itl_ms"] = max(gaps, default=0.0) * 1000  # the longest freeze a reader saw
    out.update(_stats("e2el_ms", [r.e2el for r in done]))
    out = {k: round(v, DIGITS) if isinstance(v, float) else v for k, v in out.items()}
    if slo:
        out["slo"] = slo
        out["good"] = good
        out["slo_misses"] = slo_misses(out, slo)
    errors = sorted({r.error for r in results if r.error})
    if errors:
        out["errors"] = errors[:5]
    return out


def slo_misses(level: dict[str, Any], slo: dict[str, float]) -> list[str]:
    """Why a level misses its SLO: any failed request, or a p99 above its bound."""
    misses = []
    if level["failed"]:
        misses.append(f"{level['failed']} of {level['num_prompts']} requests failed")
    for metric, bound in slo.items():
        p99 = level[f"p99_{metric}"]
        if p99 > bound:
            misses.append(f"p99 {metric} {p99:g} > {bound:g}")
    return misses
