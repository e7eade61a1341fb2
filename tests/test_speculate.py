"""Prompt-lookup speculative decoding: drafting, verification in the shared batch, exact outputs.

The fake decode model continues a pattern, so drafts from the prompt are accepted (the pattern
is the prompt's) or rejected (the model's pattern differs); its KV bookkeeping asserts every
decoded position extends its sequence's cells, so a rejected draft left in the cache fails the
next decode of that sequence.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from mlserve.engine.api import ErrorEvent, FinishEvent, GenerationRequest, Sampling, TokenEvent
from mlserve.engine.llama.engine import EngineConfig, LlamaEngine
from mlserve.engine.prefill import StepCost
from mlserve.engine.scheduler import Scheduler
from mlserve.engine.speculate import Drafter, draft_len
from mlserve.engine.tuning import Tuning
from tests.support.fake_decode import FakeDecodeModel
from tests.test_deterministic import Fake
from tests.test_scheduler import Events, Sink, request, run, submit

PATTERN = [20, 21, 22, 23]
PROMPT = [1] + PATTERN * 6


def cycle(order: list[int]) -> Callable[[int, int], int]:
    """A model that continues ``order`` cyclically (and says 20 after anything else)."""
    nxt = {a: b for a, b in zip(order, order[1:] + order[:1], strict=True)}
    return lambda token, pos: nxt.get(token, order[0])


def always_draft(rates: list[float], lefts: list[int], n_streams: int, cost: StepCost, k_max: int) -> int:
    """A policy that always verifies the most drafts allowed (exactness must not depend on the policy)."""
    return k_max


def make(speculate: bool = True, draft_max: int = 8, **kw: object) -> tuple[Scheduler, FakeDecodeModel]:
    model = FakeDecodeModel(**kw)  # type: ignore[arg-type]
    tuning = Tuning(max_step_ms=1000.0, speculate=speculate, draft_max=draft_max)
    return Scheduler(model, Events(), 8, tuning, clock=model.clock), model


def outputs(
    speculate: bool, reqs: list[GenerationRequest], **kw: object
) -> tuple[list[Sink], Scheduler, FakeDecodeModel]:
    sched, model = make(speculate, **kw)
    sinks = [submit(sched, r) for r in reqs]
    run(sched, *sinks)
    return sinks, sched, model


def tokens_of(model: FakeDecodeModel, slot: int) -> list[tuple[int, int]]:
    """(position, token) fed to a sequence by successful calls, in order."""
    return [
        (p, t) for c in model.calls if not c.rc for t, p, s in zip(c.tokens, c.pos, c.seqs, strict=True) if s == slot
    ]


def summary(sinks: list[Sink]) -> list[tuple[str, object]]:
    return [(s.text(), s.end()) for s in sinks]


# -- the drafter and the pay-off rule ---------------------------------------------------------
def test_drafter_prefers_the_longest_latest_ngram() -> None:
    assert Drafter([1, 2, 3, 7, 2, 3, 9, 1, 2, 3]).draft(3) == [7, 2, 3]  # the 3-gram beats the later 2-gram
    assert Drafter([5, 6, 7, 5, 6, 8, 5, 6]).draft(2) == [8, 5]  # the latest occurrence
    assert Drafter([1, 2, 3, 4]).draft(4) == []  # nothing repeats
    d = Drafter([4, 5, 6])
    assert d.draft(2) == []
    d.history += [4, 5]
    assert d.draft(2) == [6, 4]  # the index grows with the history


def test_acceptance_estimate_moves_with_verifications() -> None:
    d = Drafter([1])
    assert d.rate == 0.7  # the prior: hopeful enough to try
    for _ in range(10):
        d.verified(4, 4)
    assert d.rate > 0.9
    for _ in range(20):
        d.verified(0, 4)
    assert d.rate < 0.4
    before = d.rate
    d.idle()
    assert d.rate > before  # toward the prior: a sequence gets probed again


def test_drafts_pay_alone_and_not_in_a_full_batch() -> None:
    cost = StepCost(ms_ubatch=20.0, ms_token=4.0, ms_logits=0.0)  # one stream: 24 ms; each draft +4 ms
    assert draft_len([0.95], [100], 1, cost, 8) == 8
    assert 1 <= draft_len([0.6], [100], 1, cost, 8) <= 4
    assert draft_len([0.1], [100], 1, cost, 8) == 0  # mostly rejected: the plain step is faster
    full = StepCost(ms_ubatch=20.0, ms_token=4.0, ms_logits=0.0)  # eight streams: 52 ms a step
    assert draft_len([0.5] * 8, [100] * 8, 8, full, 8) == 0
    assert draft_len([0.95] * 8, [100] * 8, 8, full, 8) > 0
    gemma = StepCost()  # its output layer makes a verified position cost nearly a whole step
    assert draft_len([0.5], [100], 1, gemma, 8) == 0 and draft_len([0.9], [100], 1, gemma, 8) > 0
    assert draft_len([0.95], [100], 1, cost, 3) == 3  # the step's room caps it


# -- exact outputs ----------------------------------------------------------------------------------
def test_accepted_drafts_give_the_same_output_in_fewer_steps() -> None:
    req = lambda: request("a", PROMPT, max_tokens=40)  # noqa: E731
    off, _, m_off = outputs(False, [req()], n_seq=2, n_batch=64, next_token=cycle(PATTERN))
    on, sched, m_on = outputs(True, [req()], n_seq=2, n_batch=64, next_token=cycle(PATTERN))
    assert summary(on) == summary(off)
    st = sched.stats
    assert st.draft_accepted >= 20 and st.draft_accepted == st.draft_tokens  # the model follows the prompt
    assert len(m_on.calls) < len(m_off.calls) / 2


def erratic(token: int, pos: int) -> int:
    """A model whose next token follows its position, not the n-grams before it: most drafts fail."""
    return 20 + ((pos * 2654435761) >> 7) % 4


def test_rejected_drafts_leave_no_cells_and_change_nothing() -> None:
    req = lambda: request("a", PROMPT, max_tokens=30)  # noqa: E731
    off, _, _ = outputs(False, [req()], n_seq=2, next_token=erratic)
    on, sched, model = outputs(True, [req()], n_seq=2, next_token=erratic)
    assert summary(on) == summary(off)
    st = sched.stats
    assert st.draft_accepted < st.draft_tokens  # drafts were rejected
    # The fake asserted every position extended the cells; what they hold is the prompt and output only.
    text = "".join(f"<{t}>" for t in PROMPT[1:])
    assert off[0].text() and text  # both ran; the cells end where the fed tokens end
    fed = tokens_of(model, 0)
    kept = {p: t for p, t in fed}  # the last token fed at each position is what the cells hold
    assert [kept[p] for p in range(len(model.cells[0]))][: len(PROMPT)] == PROMPT


def test_a_rejected_draft_never_reaches_another_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mlserve.engine.batching.draft_len", always_draft)  # drafts beside b at every step

    def other() -> GenerationRequest:
        return request("b", [1, 50, 51, 52], max_tokens=25)

    def order(token: int, pos: int) -> int:  # sequence a is erratic; b counts up
        return erratic(token, pos) if 20 <= token <= 24 or token == 1 else token + 1

    alone, _, m_alone = outputs(False, [other()], n_seq=2, next_token=order)
    both, sched, m_both = outputs(True, [request("a", PROMPT, max_tokens=25), other()], n_seq=2, next_token=order)
    assert sched.stats.draft_tokens > sched.stats.draft_accepted  # a's drafts were rejected beside b
    assert both[1].text() == alone[0].text()
    assert tokens_of(m_both, 1) == tokens_of(m_alone, 0)  # b's cells got exactly the same inputs
    assert any(len(set(c.seqs)) == 2 and c.seqs.count(0) > 1 for c in m_both.calls)  # drafts shared a call


def test_max_tokens_is_exact_with_drafts() -> None:
    for n in (1, 2, 5, 9):
        sinks, sched, model = outputs(True, [request("a", PROMPT, max_tokens=n)], next_token=cycle(PATTERN))
        end = sinks[0].end()
        assert isinstance(end, FinishEvent) and end.reason == "length" and end.completion_tokens == n
        assert sinks[0].text() == "".join(f"<{t}>" for t in (PATTERN * 4)[:n])
        # The last emitted token is never decoded, and no draft went past it.
        assert max(p for p, _ in tokens_of(model, 0)) == len(PROMPT) + n - 2


def test_stop_string_inside_accepted_drafts() -> None:
    pieces = {22: b"X"}
    req = lambda: request("a", PROMPT, max_tokens=40, stop=("X",))  # noqa: E731
    off, _, _ = outputs(False, [req()], next_token=cycle(PATTERN), pieces=pieces)
    on, _, _ = outputs(True, [req()], next_token=cycle(PATTERN), pieces=pieces)
    assert summary(on) == summary(off)
    end = on[0].end()
    assert isinstance(end, FinishEvent) and end.reason == "stop" and on[0].text() == "<20><21>"


def test_end_of_generation_inside_drafts() -> None:
    order = [20, 21, 22, 999]
    prompt = [1] + order * 4
    off, _, _ = outputs(False, [request("a", prompt, max_tokens=40)], next_token=cycle(order))
    on, _, _ = outputs(True, [request("a", prompt, max_tokens=40)], next_token=cycle(order))
    assert summary(on) == summary(off)
    assert isinstance(on[0].end(), FinishEvent) and on[0].end().completion_tokens == 4  # type: ignore[union-attr]


# -- who speculates -----------------------------------------------------------------------------------
def _max_run(model: FakeDecodeModel, slot: int, after: int) -> int:
    """Most tokens one call fed a sequence at positions from ``after`` on (1: no drafts)."""
    return max(
        (sum(1 for s, p in zip(c.seqs, c.pos, strict=True) if s == slot and p >= after) for c in model.calls), default=0
    )


def test_opted_out_deterministic_and_grammar_requests_do_not_draft() -> None:
    reqs = [
        GenerationRequest("out", PROMPT, Sampling(max_tokens=20, temperature=0), speculate=False),
        GenerationRequest("det", PROMPT, Sampling(max_tokens=20, temperature=0), deterministic=True),
        GenerationRequest("gbnf", PROMPT, Sampling(max_tokens=20, temperature=0, grammar='root ::= "x"')),
    ]
    for req in reqs:
        _, sched, model = outputs(True, [req], n_seq=2, next_token=cycle(PATTERN))
        assert sched.stats.draft_tokens == 0, req.id
        slot = model.calls[-1].seqs[0]
        assert _max_run(model, slot, len(PROMPT)) == 1, req.id
    _, sched, _ = outputs(False, [request("a", PROMPT, max_tokens=20)], next_token=cycle(PATTERN))
    assert sched.stats.draft_tokens == 0  # served without speculation


def test_no_room_with_drafts_retries_without_them() -> None:
    req = lambda: request("a", PROMPT, max_tokens=30)  # noqa: E731
    off, _, _ = outputs(False, [req()], next_token=cycle(PATTERN))
    # Any call above 3 tokens finds no KV slot: a drafted step fails and is redone with fewer drafts.
    tight, sched, model = outputs(True, [req()], next_token=cycle(PATTERN), max_tokens=3)
    assert summary(tight) == summary(off)
    assert sched.stats.sequences_failed == 0 and sched.stats.draft_accepted > 0
    assert any(c.rc == 1 and c.pos[0] >= len(PROMPT) for c in model.calls)  # a drafted step did fail


def test_sink_sees_each_accepted_token_in_order() -> None:
    sinks, _, _ = outputs(True, [request("a", PROMPT, max_tokens=12)], next_token=cycle(PATTERN))
    texts = [e.text for e in sinks[0] if isinstance(e, TokenEvent)]
    assert "".join(texts) + (sinks[0].end().text if isinstance(sinks[0].end(), FinishEvent) else "") == sinks[0].text()  # type: ignore[union-attr]
    assert all(e.n_tokens == 1 for e in sinks[0] if isinstance(e, TokenEvent))


# -- the per-request opt-out on every surface ----------------------------------------------------
OPT_OUT = {"mlserve": {"speculate": False}}
BODIES = {
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "Hi"}]},
    "/v1/completions": {"model": "m", "prompt": "Hi"},
    "/api/chat": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": False},
    "/api/generate": {"model": "m", "prompt": "Hi", "stream": False},
    "/v1/messages": {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
}


@pytest.mark.parametrize("route", list(BODIES))
def test_opt_out_reaches_the_engine(home: Path, route: str) -> None:
    app = Fake(home)
    with app.client:
        assert app.client.post(route, json=BODIES[route]).status_code == 200
        r = app.client.post(route, json={**BODIES[route], **OPT_OUT})
        assert r.status_code == 200, r.text
        bad = app.client.post(route, json={**BODIES[route], "mlserve": {"speculate": "sometimes"}})
        assert bad.status_code == 400
    assert [q.speculate for q in app.engine.requests] == [True, False]


def test_deterministic_request_keeps_its_calls_beside_speculating_ones() -> None:
    tokens = [2] + [30, 31, 32] * 5

    def own(model: FakeDecodeModel) -> list[tuple[list[int], list[int], list[bool]]]:
        slot = next(s for c in model.calls for t, s in zip(c.tokens, c.seqs, strict=True) if t == 2)
        return [(c.tokens, c.pos, c.want) for c in model.calls if not c.rc and slot in c.seqs]

    def det() -> GenerationRequest:
        return GenerationRequest("d", tokens, Sampling(max_tokens=12, temperature=0), deterministic=True)

    both = cycle([30, 31, 32] + PATTERN)
    idle, _, m_idle = outputs(True, [det()], n_seq=3, next_token=both)
    busy, sched, m_busy = outputs(True, [request("s", PROMPT, max_tokens=30), det()], n_seq=3, next_token=both)
    assert sched.stats.draft_accepted > 0  # its neighbour speculated meanwhile
    assert own(m_busy) == own(m_idle) and busy[1].text() == idle[0].text()
    assert all(len(toks) == 1 for toks, _, _ in own(m_idle)[1:])  # one token per call: it never drafted


# -- llama.cpp's own samplers (a tiny random GGUF: milliseconds) ---------------------------------
def _tiny_outputs(path: Path, speculate: bool, sampling: Sampling) -> tuple[list[str], int, int]:
    async def run() -> tuple[list[str], int, int]:
        config = EngineConfig(path, "t:1", ctx_size=512, parallel=4, threads=1, tuning=Tuning(speculate=speculate))
        engine = LlamaEngine(config)
        await engine.start()

        async def one(i: int) -> str:
            tokens = [1] + [10 + (j % 7) for j in range(40 + i)]  # a repeating prompt: drafts to verify
            parts = []
            async for ev in engine.generate(GenerationRequest(f"r{i}", tokens, sampling)):
                assert not isinstance(ev, ErrorEvent), ev
                parts.append(ev.text)
            return "".join(parts)

        try:
            texts = await asyncio.gather(*(one(i) for i in range(4)))
            st = engine.stats()
            assert st is not None
            return list(texts), st.draft_tokens, st.draft_accepted
        finally:
            await engine.close()

    return asyncio.run(run())


def test_tiny_model_greedy_and_seeded_outputs_do_not_change(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four concurrent streams, native samplers: greedy, and seeded sampling (one draw per emitted token)."""
    monkeypatch.setattr("mlserve.engine.batching.draft_len", always_draft)
    for sampling in (Sampling(max_tokens=100, temperature=0), Sampling(max_tokens=100, temperature=0.8, seed=5)):
        plain, drafted_off, _ = _tiny_outputs(tiny_gguf, False, sampling)
        fast, drafted, _ = _tiny_outputs(tiny_gguf, True, sampling)
        assert drafted_off == 0 and drafted > 0
        assert fast == plain, sampling


def test_streams_verify_equal_runs_so_a_step_stays_one_micro_batch() -> None:
    # b's prompt repeats only its last token: its lookup finds a 1-token draft, padded to a's length.
    reqs = [request("a", PROMPT, max_tokens=30), request("b", [1, 60, 61, 62, 63, 64, 62], max_tokens=30)]

    def model_next(token: int, pos: int) -> int:
        return cycle(PATTERN)(token, pos) if token in PATTERN or token == 1 and pos > 10 else 62

    on, sched, model = outputs(True, reqs, n_seq=2, next_token=model_next)
    off, _, _ = outputs(False, reqs, n_seq=2, next_token=model_next)
    assert summary(on) == summary(off)
    verifying = [c for c in model.calls if not c.rc and all(c.want) and len(set(c.seqs)) == 2]  # no prompt chunk
    runs = [sorted({c.seqs.count(s) for s in set(c.seqs)}) for c in verifying]
    drafted = [r for r in runs if max(r) > 1]
    assert drafted and all(len(r) == 1 for r in drafted), runs  # both streams had runs of one length


def test_streams_draft_beside_a_prompt_chunk_and_leave_it_half_the_step() -> None:
    # Gemma-like costs on 2 CPU threads: a verified position costs two-thirds of a one-token step.
    model = FakeDecodeModel(
        n_seq=4, n_batch=512, ms_fixed=6.9, ms_per_token=5.7, ms_per_logits=5.9, next_token=cycle(PATTERN)
    )
    sched = Scheduler(model, Events(), 8, Tuning(max_step_ms=100.0), clock=model.clock)
    streams = [submit(sched, request(f"s{i}", PROMPT, 400)) for i in range(2)]
    for _ in range(10):
        sched.step()
    drafted_alone = sched.stats.draft_tokens  # two streams alone: drafting does not beat the plain step here
    newcomer = submit(sched, request("new", list(range(5000, 6500)), 2))
    calls_before = len(model.calls)
    while not newcomer:
        sched.step()
    assert sched.stats.draft_accepted > drafted_alone  # beside the chunk, the streams drafted ...
    for call in model.calls[calls_before:]:
        prompt_tokens = sum(1 for t in call.tokens if t >= 5000)
        drafts = len(call.tokens) - prompt_tokens - 2
        assert drafts <= max(prompt_tokens, 8), call  # ... never taking more than the prompt's half
    assert all(s.end() is None for s in streams)
