"""How llama.cpp splits a packed batch into micro-batches, and how the scheduler packs a step to keep them few.

With per-sequence KV streams llama.cpp puts only consecutive sequence ids in one micro-batch,
and each micro-batch reads all the weights again. ``Batch.ubatches`` (what the step-cost fit is
told) is checked against the fake model's token-by-token rendering of llama.cpp's split.
"""

from __future__ import annotations

import random

from mlserve.engine.batch import Batch
from mlserve.engine.scheduler import Scheduler
from mlserve.engine.tuning import Tuning
from tests.support.fake_decode import FakeDecodeModel, split
from tests.test_scheduler import Events, prompt, request, submit


def _batch(runs: list[tuple[int, int]]) -> Batch:
    b = Batch()
    for seq, n in runs:
        b.add(seq, [0] * n, 0, logits=False)
    return b


def test_only_consecutive_sequence_ids_share_a_micro_batch() -> None:
    assert _batch([(0, 1), (1, 1), (2, 1), (3, 32)]).ubatches(512) == 2  # 4 x 1, then the chunk's rest
    assert _batch([(0, 1), (2, 1), (5, 1), (7, 32)]).ubatches(512) == 4  # a gap between ids splits
    assert _batch([(2, 1), (0, 1), (1, 1)]).ubatches(512) == 2  # batch order: 2 first, then 0 and 1
    assert _batch([(0, 5), (1, 5), (2, 1), (3, 5)]).ubatches(512) == 3  # 4 x 1; then 0-1 x 4; then 3 x 4
    assert _batch([(7, 1300)]).ubatches(512) == 3  # at most n_ubatch tokens each
    assert _batch([]).ubatches(512) == 0


def test_ubatch_count_matches_llama_cpps_split_token_by_token() -> None:
    rng = random.Random(7)
    for _ in range(500):
        ids = rng.sample(range(8), rng.randint(1, 8))
        runs = [(s, rng.choice([1, 1, 2, 5, 9, rng.randint(1, 80)])) for s in ids]
        seqs = [s for s, n in runs for _ in range(n)]
        n_ubatch = rng.choice([16, 64, 512])
        assert _batch(runs).ubatches(n_ubatch) == len(split(seqs, n_ubatch)), (runs, n_ubatch)


def test_prompts_between_two_streams_bridge_them_into_one_micro_batch() -> None:
    model = FakeDecodeModel(n_seq=4, n_batch=512, ms_fixed=20.0, ms_per_token=3.0)
    sched = Scheduler(model, Events(), 8, Tuning(speculate=False), clock=model.clock)
    a = submit(sched, request("a", prompt(10, 8), 400))
    short = [submit(sched, request(f"s{i}", prompt(100 * (i + 1), 8), 1)) for i in range(2)]
    d = submit(sched, request("d", prompt(300, 8), 400))
    while any(s.end() is None for s in short):
        sched.step()
    # The lowest free slots, 1 and 2, between streams a (0) and d (3). The shorter prompt takes the
    # step's budget; the longer one still gets a token, so that a, both prompts and d are consecutive.
    long = submit(sched, request("long", prompt(5000, 900), 2))
    shorter = submit(sched, request("shorter", prompt(7000, 400), 2))
    steps = 0
    while not shorter:
        at = len(model.calls)
        sched.step()
        steps += 1
        for call in model.calls[at:]:
            assert call.seqs == sorted(call.seqs), "runs in ascending sequence id"
            first = {call.seqs[i] for i in split(call.seqs, model.n_batch)[0]}
            assert first == {0, 1, 2, 3}, call.seqs  # both streams and both prompts in one micro-batch
    assert steps > 3 and a.end() is None and d.end() is None and not long
