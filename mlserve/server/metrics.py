"""Prometheus metrics (``mlserve_*``); labels are model, route and status only, never text."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from mlserve.engine.api import BATCH_BUCKETS, EMBED_BUCKETS, StepStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class _EngineCollector(Collector):
    """Reads each engine's scheduler counters at scrape time."""

    def __init__(self, stats: Callable[[], Iterable[tuple[str, StepStats]]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily("mlserve_active_sequences", "Sequences decoding in the batch", labels=["model"])
        queued = GaugeMetricFamily("mlserve_queue_depth", "Requests waiting for a sequence slot", labels=["model"])
        cells = GaugeMetricFamily("mlserve_kv_cells_used", "KV cache cells held by active sequences", labels=["model"])
        last = GaugeMetricFamily(
            "mlserve_batch_tokens_last", "Tokens in the most recent llama_decode", labels=["model"]
        )
        steps = CounterMetricFamily("mlserve_decode_steps", "llama_decode calls", labels=["model"])
        tokens = CounterMetricFamily("mlserve_batch_tokens", "Tokens packed into llama_decode calls", labels=["model"])
        hits = CounterMetricFamily(
            "mlserve_prefix_cache_hits", "Requests that reused cached prefix cells", labels=["model"]
        )
        reused = CounterMetricFamily(
            "mlserve_prefix_cache_tokens", "Prompt tokens taken from the prefix cache", labels=["model"]
        )
        drafted = CounterMetricFamily(
            "mlserve_speculative_draft_tokens", "Prompt-lookup draft tokens verified", labels=["model"]
        )
        accepted = CounterMetricFamily(
            "mlserve_speculative_accepted_tokens", "Draft tokens the model accepted", labels=["model"]
        )
        verified = CounterMetricFamily(
            "mlserve_speculative_verifications", "Sequence steps that verified at least one draft", labels=["model"]
        )
        sizes = HistogramMetricFamily(
            "mlserve_batch_size_tokens",
            "Tokens per llama_decode step (decode tokens plus prompt chunks)",
            labels=["model"],
        )
        embed = HistogramMetricFamily(
            "mlserve_embedding_batch_inputs",
            "Inputs per embeddings llama_decode (count: embeddings decode calls)",
            labels=["model"],
        )
        for model, st in self._stats():
            embed.add_metric([model], _buckets(EMBED_BUCKETS, st.embed_hist), sum_value=st.embed_inputs)
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, BATCH_BUCKETS), "+Inf"), st.batch_hist, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            sizes.add_metric([model], buckets, sum_value=st.batch_tokens_total)
            active.add_metric([model], st.active)
            queued.add_metric([model], st.queued)
            cells.add_metric([model], st.kv_cells_used)
            last.add_metric([model], st.last_batch_tokens)
            steps.add_metric([model], st.steps)
            tokens.add_metric([model], st.batch_tokens_total)
            hits.add_metric([model], st.prefix_hits)
            reused.add_metric([model], st.prefix_tokens_reused)
            drafted.add_metric([model], st.draft_tokens)
            accepted.add_metric([model], st.draft_accepted)
            verified.add_metric([model], st.draft_verifications)
        yield from (active, queued, cells, last, steps, tokens, hits, reused, drafted, accepted, verified, sizes, embed)


def _buckets(bounds: tuple[int, ...], counts: list[int]) -> list[tuple[str, int]]:
    """Prometheus's cumulative buckets from per-bucket counts (the last one: above every bound)."""
    cumulative, out = 0, []
    for bound, count in zip((*map(str, bounds), "+Inf"), counts, strict=True):
        cumulative += count
        out.append((bound, cumulative))
    return out


class Metrics:
    """One registry per app, so several apps (tests) never collide."""

    def __init__(self, stats: Callable[[], Iterable[tuple[str, StepStats]]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mlserve_requests", "HTTP requests", ["model", "route", "status"], registry=r)
        self.ttft = Histogram(
            "mlserve_time_to_first_token_seconds", "Time to first token", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.duration = Histogram(
            "mlserve_request_duration_seconds", "Request duration", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "mlserve_queue_wait_seconds", "Wait for a sequence slot", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("mlserve_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("mlserve_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.in_flight = Gauge("mlserve_requests_in_flight", "Inference requests in flight", ["model"], registry=r)
        self.engine_up = Gauge("mlserve_model_ready", "1 when the model is loaded and warmed", ["model"], registry=r)
        r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return bytes(generate_latest(self.registry))
