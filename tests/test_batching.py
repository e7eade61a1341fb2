"""Continuous batching keeps sequences apart, and short requests are not blocked by long ones."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from mlserve.engine.api import ErrorEvent, FinishEvent, GenerationRequest, Sampling
from mlserve.engine.llama.engine import EngineConfig, LlamaEngine
from mlserve.engine.llama.model import LlamaModel

pytestmark = pytest.mark.model
DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "dialogue-to-note.jsonl"
N_SEQ = 8
LENGTH = 24


@pytest.fixture(scope="module")
def model(gemma_path: Path) -> Iterator[LlamaModel]:
    m = LlamaModel(gemma_path, n_ctx_seq=256, n_seq=N_SEQ, n_threads=2)
    yield m
    m.close()


def _sequences(model: LlamaModel) -> list[list[int]]:
    lines = DATA.read_text().splitlines()[:N_SEQ]
    return [model.tokenize(json.loads(line)["dialogue"][i * 50 :])[:LENGTH] for i, line in enumerate(lines)]


def _alone(model: LlamaModel, tokens: list[int]) -> np.ndarray:
    model.clear_seq(0)
    n = len(tokens)
    model.decode(tokens, list(range(n)), [0] * n, [True] * n)
    out = np.stack([model.logits(i) for i in range(n)])
    model.clear_seq(0)
    return out


def _batched(model: LlamaModel, seqs: list[list[int]], seq_of: Callable[[int, int], int]) -> list[np.ndarray]:
    """Decode all sequences together, one position per step, as the scheduler's decode steps do."""
    for s in range(N_SEQ):
        model.clear_seq(s)
    rows: list[list[np.ndarray]] = [[] for _ in seqs]
    for t in range(LENGTH):
        ids = list(range(len(seqs)))
        model.decode([seqs[i][t] for i in ids], [t] * len(ids), [seq_of(i, t) for i in ids], [True] * len(ids))
        for i in ids:
            rows[i].append(model.logits(i))
    for s in range(N_SEQ):
        model.clear_seq(s)
    return [np.stack(r) for r in rows]


@pytest.fixture(scope="module")
def alone(model: LlamaModel) -> list[np.ndarray]:
    seqs = _sequences(model)
    assert len({tuple(s) for s in seqs}) == N_SEQ and all(len(s) == LENGTH for s in seqs)
    return [_alone(model, s) for s in seqs]


def _agreement(model: LlamaModel, alone: list[np.ndarray], seq_of: Callable[[int, int], int]) -> tuple[float, float]:
    seqs = _sequences(model)
    together = _batched(model, seqs, seq_of)
    top = np.mean([np.mean(a.argmax(1) == b.argmax(1)) for a, b in zip(alone, together, strict=False)])
    cos = min(
        float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
        for a, b in zip(alone, together, strict=False)
    )
    return float(top), cos


def test_batched_decoding_matches_alone_teacher_forced(model: LlamaModel, alone: list[np.ndarray]) -> None:
    top, cos = _agreement(model, alone, lambda i, t: i)
    assert top >= 0.90, f"top-token agreement {top:.3f}"
    assert cos >= 0.98, f"worst logit cosine {cos:.4f}"


def test_wrong_seq_id_is_caught(model: LlamaModel, alone: list[np.ndarray]) -> None:
    # Sequence 3 writes its second half into sequence 4's cells: it must show.
    top, cos = _agreement(model, alone, lambda i, t: 4 if (i == 3 and t >= LENGTH // 2) else i)
    assert top < 0.90 or cos < 0.98


def test_short_request_overtakes_long_ones(gemma_path: Path) -> None:
    async def run() -> list[str]:
        engine = LlamaEngine(EngineConfig(gemma_path, "gemma3-270m:1", ctx_size=512, parallel=4))
        await engine.start()
        order: list[str] = []
        started = asyncio.Event()

        async def go(name: str, prompt: str, max_tokens: int) -> None:
            req = GenerationRequest(name, await engine.tokenize(prompt), Sampling(max_tokens=max_tokens, temperature=0))
            n = 0
            async for ev in engine.generate(req):
                n += 1
                if n == 5:
                    started.set()
                if isinstance(ev, FinishEvent):
                    order.append(f"{name}:{ev.completion_tokens}")

        longs = [asyncio.create_task(go(f"long{i}", "Once upon a time", 150)) for i in range(2)]
        await asyncio.wait_for(started.wait(), 60)
        t0 = time.monotonic()
        await go("short", "The patient", 4)
        short_took = time.monotonic() - t0
        await asyncio.gather(*longs)
        await engine.close()
        assert short_took < 5
        return order

    order = asyncio.run(run())
    assert order[0] == "short:4", order


def test_prefix_reuse_skips_shared_prompt(gemma_path: Path) -> None:
    system = json.loads(DATA.read_text().splitlines()[0])["dialogue"][:1200]

    async def run() -> tuple[list[str], int, int, int]:
        engine = LlamaEngine(EngineConfig(gemma_path, "gemma3-270m:1", ctx_size=1024, parallel=2))
        await engine.start()
        texts = []
        prefix = await engine.tokenize(system)
        for question in ("What is the diagnosis?", "What is the diagnosis?", "List the medications."):
            tokens = prefix + await engine.tokenize(" " + question, add_special=False)
            req = GenerationRequest(question, tokens, Sampling(max_tokens=8, temperature=0))
            parts = [ev.text async for ev in engine.generate(req) if not isinstance(ev, ErrorEvent)]
            texts.append("".join(parts))
        stats = engine.stats()
        assert stats is not None
        await engine.close()
        return texts, stats.prefix_hits, stats.prefix_tokens_reused, len(prefix)

    texts, hits, reused, n_prefix = asyncio.run(run())
    # The 2nd and 3rd requests found the whole shared prefix in the slot the 1st one left.
    assert hits >= 2
    assert reused >= 2 * n_prefix
    assert texts[0] == texts[1]  # reusing the cells changes nothing for the same prompt


def test_unloading_the_engine_ends_every_request(gemma_path: Path) -> None:
    async def run() -> list[object]:
        engine = LlamaEngine(EngineConfig(gemma_path, "gemma3-270m:1", ctx_size=512, parallel=1))
        await engine.start()
        running = GenerationRequest("running", await engine.tokenize("Once upon a time"), Sampling(400, temperature=0))
        queued = GenerationRequest("queued", await engine.tokenize("The patient"), Sampling(400, temperature=0))
        first = asyncio.Event()

        async def consume(req: GenerationRequest) -> object:
            last: object = None
            async for ev in engine.generate(req):
                first.set()
                last = ev
            return last

        tasks = [asyncio.create_task(consume(running)), asyncio.create_task(consume(queued))]
        await asyncio.wait_for(first.wait(), 60)
        await engine.close()
        return list(await asyncio.wait_for(asyncio.gather(*tasks), 30))

    ends = asyncio.run(run())
    assert all(type(e).__name__ == "ErrorEvent" for e in ends), ends
