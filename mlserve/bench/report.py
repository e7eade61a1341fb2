"""The benchmark document (``{"target", "model", "env", "results"}``) and the rows its tables show."""

from __future__ import annotations

from typing import Any

# (label, key) in the order vLLM prints them; the table shows exactly the JSON's numbers.
ROWS: tuple[tuple[str, str], ...] = (
    ("Successful requests", "completed"),
    ("Failed requests", "failed"),
    ("Benchmark duration (s)", "duration"),
    ("Total input tokens", "total_input_tokens"),
    ("Total generated tokens", "total_output_tokens"),
    ("Request throughput (req/s)", "request_throughput"),
    ("Request goodput (req/s)", "request_goodput"),
    ("Output token throughput (tok/s)", "output_throughput"),
    ("Total token throughput (tok/s)", "total_token_throughput"),
    *(
        (f"{stat} {label} (ms)", f"{prefix}_{metric}")
        for metric, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2EL"))
        for stat, prefix in (("Mean", "mean"), ("Median", "median"), ("P99", "p99"))
    ),
    ("Max ITL (ms)", "max_itl_ms"),
)


def document(target: str, model: str, env: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The one JSON document ``--json`` and ``--output`` write."""
    return {"target": target, "model": model, "env": env, "results": results}


def fmt(value: Any) -> str:
    """A number as the table shows it (the JSON already holds it rounded)."""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def title(result: dict[str, Any]) -> str:
    """A table title for one level."""
    parts = []
    if result["request_rate"] != "inf":
        parts.append(f"request rate {result['request_rate']}/s")
    if result["max_concurrency"] is not None:
        parts.append(f"concurrency {result['max_concurrency']}")
    return ", ".join(parts) or "unbounded"


def slo_failures(results: list[dict[str, Any]]) -> list[str]:
    """Every SLO miss, prefixed by its level."""
    return [f"{title(r)}: {miss}" for r in results for miss in r.get("slo_misses", [])]
