"""llama-bench-style offline throughput: prompt processing (pp) and generation (tg) tokens/s on the engine.

No HTTP. The caller hands in a loaded model (``mlserve.engine.llama.model.LlamaModel``
or anything with the same few methods), so this core module never imports the engine.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Protocol


class DecodeModel(Protocol):
    """What the offline bench needs from a model: batched decode and a native sampler."""

    n_vocab: int
    n_batch: int

    def decode(self, tokens: list[int], pos: list[int], seqs: list[int], want: list[bool]) -> None: ...
    def new_sampler(self, cfg: Any) -> Any: ...
    def sample(self, sampler: Any, index: int) -> int: ...
    def free_sampler(self, sampler: Any) -> None: ...
    def clear_seq(self, seq: int, p0: int = -1) -> bool: ...


@dataclass(frozen=True)
class OfflineResult:
    """One test (``pp128`` or ``tg64``) over its repetitions."""

    test: str
    n_prompt: int
    n_gen: int
    samples_ts: list[float]

    @property
    def avg_ts(self) -> float:
        """Mean tokens per second."""
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        """Sample standard deviation of tokens per second (0 for one repetition)."""
        return statistics.stdev(self.samples_ts) if len(self.samples_ts) > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """llama-bench's JSON key names."""
        return {
            "test": self.test,
            "n_prompt": self.n_prompt,
            "n_gen": self.n_gen,
            "avg_ts": round(self.avg_ts, 3),
            "stddev_ts": round(self.stddev_ts, 3),
            "samples_ts": [round(s, 3) for s in self.samples_ts],
        }


def _tokens(model: DecodeModel, n: int, rng: random.Random) -> list[int]:
    # Random ids, as llama-bench does; the first few ids are often control tokens, so skip them.
    return [rng.randrange(min(256, model.n_vocab - 1), model.n_vocab) for _ in range(n)]


def prompt_processing(model: DecodeModel, n_prompt: int, rng: random.Random) -> float:
    """Seconds to decode ``n_prompt`` tokens as batches of up to n_batch (logits only for the last)."""
    model.clear_seq(0)
    tokens = _tokens(model, n_prompt, rng)
    start = perf_counter()
    for at in range(0, n_prompt, model.n_batch):
        part = tokens[at : at + model.n_batch]
        last = at + len(part) == n_prompt
        model.decode(part, list(range(at, at + len(part))), [0] * len(part), [False] * (len(part) - 1) + [last])
    elapsed = perf_counter() - start
    model.clear_seq(0)
    return elapsed


def generation(model: DecodeModel, n_gen: int, sampler_config: Any, rng: random.Random) -> float:
    """Seconds for a single-sequence decode loop of ``n_gen`` tokens with a greedy sampler."""
    model.clear_seq(0)
    sampler = model.new_sampler(sampler_config)
    try:
        model.decode(_tokens(model, 1, rng), [0], [0], [True])
        start = perf_counter()
        for pos in range(1, n_gen + 1):
            token = model.sample(sampler, 0)
            model.decode([token], [pos], [0], [True])
        elapsed = perf_counter() - start
    finally:
        model.free_sampler(sampler)
        model.clear_seq(0)
    return elapsed


def run_offline(
    model: DecodeModel,
    greedy_config: Any,
    *,
    n_prompt: int = 128,
    n_gen: int = 64,
    repetitions: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[OfflineResult]:
    """pp and tg tokens/s, each repeated; one untimed warm-up run of each first."""
    rng = random.Random(seed)
    out = []
    if n_prompt > 0:
        prompt_processing(model, n_prompt, rng)
        samples = []
        for i in range(repetitions):
            if progress:
                progress(f"pp{n_prompt} {i + 1}/{repetitions}")
            samples.append(n_prompt / prompt_processing(model, n_prompt, rng))
        out.append(OfflineResult(f"pp{n_prompt}", n_prompt, 0, samples))
    if n_gen > 0:
        generation(model, min(n_gen, 4), greedy_config, rng)
        samples = []
        for i in range(repetitions):
            if progress:
                progress(f"tg{n_gen} {i + 1}/{repetitions}")
            samples.append(n_gen / generation(model, n_gen, greedy_config, rng))
        out.append(OfflineResult(f"tg{n_gen}", 0, n_gen, samples))
    return out
