"""Deterministic requests in the scheduler, against the fake decode model: decoded alone, same calls under any load."""

from __future__ import annotations

import pytest

from mlserve.engine.api import ErrorEvent, FinishEvent, GenerationFailed, GenerationRequest, Sampling
from mlserve.engine.scheduler import MIN_REUSE
from tests.support.fake_decode import Call, FakeDecodeModel
from tests.test_scheduler import make, prompt, request, run, submit


def det(rid: str, tokens: list[int], max_tokens: int = 6) -> GenerationRequest:
    return GenerationRequest(rid, tokens, Sampling(max_tokens=max_tokens, temperature=0), deterministic=True)


def calls_of(model: FakeDecodeModel, slot: int) -> list[Call]:
    """Successful decode calls that touched a sequence id."""
    return [c for c in model.calls if not c.rc and slot in c.seqs]


def own_calls(model: FakeDecodeModel, slot: int) -> list[tuple[list[int], list[int], list[bool]]]:
    """What the calls fed one sequence: tokens, positions and logits wanted (the inputs llama.cpp computes on)."""
    return [(c.tokens, c.pos, c.want) for c in calls_of(model, slot)]


def test_deterministic_request_never_shares_a_decode_call() -> None:
    sched, model = make(n_seq=4, n_batch=16)
    others = [submit(sched, request(f"o{i}", prompt(100 * (i + 1), 20), 30)) for i in range(3)]
    for _ in range(3):  # the others are mid-prefill or generating when it arrives
        sched.step()
    sink = submit(sched, det("d", prompt(900, 40)))
    run(sched, sink, *others)
    assert isinstance(sink.end(), FinishEvent) and sink.end().completion_tokens == 6  # type: ignore[union-attr]
    slot = next(s for s in range(4) if any(900 in c.tokens for c in calls_of(model, s)))
    mine = calls_of(model, slot)
    assert mine and all(set(c.seqs) == {slot} for c in mine), "another sequence rode in its decode call"
    # Its 40-token prompt went in fixed chunks of n_batch (16, 16, 8), then one token per call.
    assert [len(c.tokens) for c in mine] == [16, 16, 8, 1, 1, 1, 1, 1]
    assert all(isinstance(s.end(), FinishEvent) for s in others)


def test_other_streams_progress_while_a_deterministic_one_runs() -> None:
    sched, model = make(n_seq=3, n_batch=64)
    other = submit(sched, request("o", prompt(100, 4), 40))
    sink = submit(sched, det("d", prompt(500, 4), 20))
    steps = 0
    while sink.end() is None:
        before = len(other)
        sched.step()
        steps += 1
        if steps > 1:  # after the first step (both prefill), every step gives the other stream a token too
            assert len(other) == before + 1, f"step {steps}: the batched stream stalled"
    assert isinstance(sink.end(), FinishEvent) and other.end() is None
    run(sched, other)
    assert isinstance(other.end(), FinishEvent)


def test_same_calls_idle_and_under_load() -> None:
    """The inputs of every call that computes the deterministic sequence are the same whatever else runs."""
    tokens = prompt(700, 37)

    idle_sched, idle = make(n_seq=4, n_batch=16)
    idle_sink = submit(idle_sched, det("d", tokens, 8))
    run(idle_sched, idle_sink)

    def tight(call: Call) -> int:  # "no KV slot" for batched calls above 12 tokens: their prefill shrinks
        return 1 if len(call.tokens) > 12 and not any(700 <= t < 800 for t in call.tokens) else 0

    busy_sched, busy = make(n_seq=4, n_batch=16, fail_when=tight)
    load = [submit(busy_sched, request(f"o{i}", prompt(100 * (i + 1), 30), 25)) for i in range(3)]
    busy_sched.step()
    busy_sink = submit(busy_sched, det("d", tokens, 8))
    run(busy_sched, busy_sink, *load)

    def slot_of(model: FakeDecodeModel) -> int:
        return next(s for s in range(4) if any(700 in c.tokens for c in calls_of(model, s)))

    assert busy_sched.stats.decode_retries > 0  # the batched prompts were cut smaller meanwhile...
    assert own_calls(busy, slot_of(busy)) == own_calls(idle, slot_of(idle))  # ...its own chunks were not
    assert busy_sink.text() == idle_sink.text()


def test_no_prefix_reuse_for_a_deterministic_request() -> None:
    sched, model = make(n_seq=2)
    shared = prompt(300, 3 * MIN_REUSE)
    run(sched, submit(sched, request("warm", shared, 2)))
    model.calls.clear()
    run(sched, submit(sched, det("d", shared + [5, 6], 2)))
    assert sched.stats.prefix_hits == 0
    first = model.calls[0]
    assert first.pos[0] == 0 and first.tokens[: len(shared)] == shared  # the whole prompt, from position 0
    # A batched request with the same prefix still reuses a cache.
    run(sched, submit(sched, request("again", shared + [7], 2)))
    assert sched.stats.prefix_hits == 1


def test_a_decode_error_fails_it_without_a_retry_in_other_chunks() -> None:
    def refuse_big(call: Call) -> int:
        return 1 if len(call.tokens) > 8 else 0

    sched, model = make(n_seq=2, n_batch=16, fail_when=refuse_big)
    ok = submit(sched, request("ok", prompt(100, 20), 3))  # batched: retried in smaller chunks, succeeds
    sink = submit(sched, det("d", prompt(500, 20), 3))
    run(sched, ok, sink)
    assert isinstance(ok.end(), FinishEvent)
    end = sink.end()
    assert isinstance(end, ErrorEvent) and isinstance(end.error, GenerationFailed)
    assert not any(500 in c.tokens and c.rc == 0 for c in model.calls), "retried in chunks that round differently"
    assert sched.stats.sequences_failed == 1 and model.live_samplers() == 0


@pytest.mark.parametrize("steps", [1, 4], ids=["prefilling", "decoding"])
def test_abort_of_a_deterministic_request_frees_its_slot(steps: int) -> None:
    sched, model = make(n_seq=1, n_batch=8)
    sink = submit(sched, det("d", prompt(10, 20), 50))
    for _ in range(steps):
        sched.step()
    sched.abort("d")
    after = submit(sched, request("b", prompt(600, 4), 2))
    run(sched, after)
    assert isinstance(sink.end(), ErrorEvent) and isinstance(after.end(), FinishEvent)
    assert model.live_samplers() == 0 and sched.stats.active == 0


def test_two_deterministic_requests_each_decode_alone() -> None:
    sched, model = make(n_seq=3, n_batch=16)
    a, b = submit(sched, det("a", prompt(100, 10))), submit(sched, det("b", prompt(200, 10)))
    run(sched, a, b)
    assert all(len(set(c.seqs)) == 1 for c in model.calls)
    assert a.text() and a.text() != b.text()


def test_batched_requests_still_share_calls() -> None:
    sched, model = make(n_seq=2, n_batch=64)
    sinks = [submit(sched, request(f"r{i}", prompt(100 * (i + 1), 5), 4)) for i in range(2)]
    run(sched, *sinks)
    assert any(len(set(c.seqs)) == 2 for c in model.calls)
