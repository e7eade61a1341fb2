"""Chunked prefill: running streams keep their pace while a newcomer's long prompt is processed.

The fake decode model charges simulated time per call and per token (no sleeping), and the
scheduler reads that clock: these tests prove the policy from the calls it made.
"""

from __future__ import annotations

from mlserve.engine.api import FinishEvent, TokenEvent
from mlserve.engine.llama.factory import Overrides, tuning
from mlserve.engine.prefill import MIN_CHUNK, StepCost, fair_share_ms, plan_prefill, prompt_budget
from mlserve.engine.scheduler import Scheduler
from mlserve.engine.tuning import Tuning
from tests.support.fake_decode import FakeDecodeModel
from tests.test_scheduler import Events, Sink, prompt, request, run, submit


def make(max_step_ms: float = 100.0, **kw: object) -> tuple[Scheduler, FakeDecodeModel]:
    model = FakeDecodeModel(**kw)  # type: ignore[arg-type]
    tuning = Tuning(max_step_ms=max_step_ms, speculate=False)
    return Scheduler(model, Events(), 8, tuning, clock=model.clock), model


def test_step_cost_learns_the_model_costs() -> None:
    cost = StepCost()
    for _ in range(60):  # a model unlike the starting estimates: 10 ms a micro-batch, 1.5 a token, 3 a logits row
        cost.observe(1, 4, 4, 10 + 4 * 1.5 + 4 * 3)
        cost.observe(1, 12, 12, 10 + 12 * 1.5 + 12 * 3)
        cost.observe(2, 34, 4, 20 + 34 * 1.5 + 4 * 3)
    # Near the truth (the starting split still weighs a little: 1.5 calls against ~20 recent ones).
    assert abs(cost.ms_ubatch - 10) < 2 and abs(cost.ms_token - 1.5) < 0.15 and abs(cost.ms_logits - 3) < 0.3
    assert abs(cost.predict(2, 34, 4) - (20 + 34 * 1.5 + 4 * 3)) < 3


def test_step_cost_keeps_sane_estimates_from_calls_of_one_shape() -> None:
    cost = StepCost()
    for _ in range(80):
        cost.observe(1, 4, 4, 1000.0)  # one shape of call only, absurdly slow
    assert cost.predict(1, 4, 4) > 500  # it learned that such a call is slow ...
    assert cost.ms_token > 0 and cost.ms_ubatch >= 0 and cost.ms_logits >= 0  # ... without a negative term


def test_plan_prefill_shortest_first_and_finishes_what_almost_fits() -> None:
    assert plan_prefill([500, 30, 2000], 40, 512) == [10, 30, 0]
    # 45 left and a budget of 40: within the slack, taken whole rather than leaving 5 for another step.
    assert plan_prefill([45, 900], 40, 512) == [45, 0]
    assert plan_prefill([60, 900], 40, 512) == [40, 0]
    assert plan_prefill([45], 40, 42) == [40]  # the batch's room is a hard limit
    # Floors first (a prompt between two streams keeps them in one micro-batch), then shortest first.
    assert plan_prefill([500, 30, 2000], 40, 512, [1, 0, 1]) == [9, 30, 1]
    assert plan_prefill([500, 3, 2000], 4, 512, [5, 5, 5]) == [5, 3, 5]  # floors may pass the budget


def test_prompt_budget_full_batch_when_nothing_streams() -> None:
    cost = StepCost(ms_ubatch=10.0, ms_token=4.0, ms_logits=0.0)
    assert prompt_budget(cost, 0, 0, 100.0, 512) == 512
    assert prompt_budget(cost, 4, 0, 100.0, 508) == 16  # (100 - 2 micro-batches - 4 tokens) / 4
    assert prompt_budget(cost, 24, 0, 100.0, 500) == MIN_CHUNK  # over the target already: still advances


def test_waiting_prompts_get_their_fair_share_of_the_step() -> None:
    cost = StepCost(ms_ubatch=10.0, ms_token=4.0, ms_logits=0.0)
    # 12 prompts beside 4 streams are owed 3 x (10 + 4 x 4) = 78 ms: more than the target leaves (64 ms).
    assert fair_share_ms(cost, 4, 12, 100.0) == 78.0
    assert prompt_budget(cost, 4, 0, 100.0, 508, n_waiting=12) == 19
    assert prompt_budget(cost, 4, 0, 100.0, 508, n_waiting=2) == 16  # owed 26 ms: the target decides
    # 24 beside 8 are owed 3 x 42 = 126 ms, but the step stops at 1.25 x the target: 125 - (20 + 32) = 73 ms.
    assert fair_share_ms(cost, 8, 24, 100.0) == 73.0
    assert prompt_budget(cost, 8, 0, 100.0, 504, n_waiting=24) == 18
    assert prompt_budget(cost, 8, 0, 100.0, 10, n_waiting=24) == 10  # the batch's room is still a hard limit
    assert prompt_budget(cost, 30, 0, 100.0, 500, n_waiting=30) == MIN_CHUNK  # past 1.25 x: the floor
    assert fair_share_ms(cost, 0, 5, 100.0) == fair_share_ms(cost, 3, 0, 100.0) == 0.0


def test_running_streams_keep_their_pace_while_a_long_prompt_prefills() -> None:
    # A model unlike the starting estimates (30 ms a call, 2 ms a token): the policy must learn it.
    sched, model = make(max_step_ms=100.0, n_seq=5, n_batch=512, ms_fixed=30.0, ms_per_token=2.0)
    streams = [submit(sched, request(f"s{i}", prompt(100 * (i + 1), 20), 400)) for i in range(4)]
    for _ in range(30):
        sched.step()
    assert all(len(s) >= 20 for s in streams)
    model.step_ms.clear()
    newcomer = submit(sched, request("new", prompt(5000, 2000), 4))
    steps_to_first = 0
    while not newcomer:
        sched.step()
        steps_to_first += 1
    # After a few steps of learning, every step beside the 4 streams stays under the target.
    assert max(model.step_ms[5:]) <= 100.0 * 1.1, model.step_ms
    # ... and the prompt still advanced by more than the minimum chunk: the budget is used.
    assert steps_to_first < 2000 / MIN_CHUNK / 1.5
    run(sched, newcomer, *streams, limit=2000)
    assert isinstance(newcomer.end(), FinishEvent)
    assert [e.text for e in newcomer if isinstance(e, TokenEvent)][0] == "<7000>"


def test_a_crowd_of_newcomers_is_not_starved_by_a_few_streams() -> None:
    # Gemma-like costs: a micro-batch 20 ms, a token 3 ms, a logits row 3 ms; two long streams.
    sched, model = make(max_step_ms=100.0, n_seq=8, n_batch=512, ms_fixed=20.0, ms_per_token=3.0, ms_per_logits=3.0)
    streams = [submit(sched, request(f"s{i}", prompt(100 * (i + 1), 20), 3000)) for i in range(2)]
    for _ in range(40):
        sched.step()
    crowd = [submit(sched, request(f"n{i}", prompt(5000 + 2000 * i, 1500), 2)) for i in range(6)]
    chunks, streamed = [], []
    while not any(crowd):
        before = [len(s) for s in streams]
        sched.step()
        chunks.append(sum(1 for t in model.calls[-1].tokens if t >= 5000))
        streamed.append([len(s) - b for s, b in zip(streams, before, strict=True)])
    # The target alone would leave (100 - 2 x 20 - 2 x 6) / 3 = 16 tokens a step; six prompts beside two
    # streams are owed 6/2 x (20 + 2 x 6) = 96 ms, capped where the step reaches 125 ms: 73 ms, 24 tokens.
    settled = sorted(chunks[10:])
    assert settled[len(settled) // 2] >= 22, chunks
    assert all(n == [1, 1] for n in streamed), streamed  # the streams still get a token every step
    assert max(model.step_ms[-len(chunks) + 10 :]) <= 125 * 1.1, model.step_ms[-len(chunks) :]


def test_a_prompt_alone_goes_in_full_batches() -> None:
    sched, model = make(n_seq=2, n_batch=256)
    sink = submit(sched, request("a", prompt(10, 1000), 2))
    run(sched, sink)
    assert [len(c.tokens) for c in model.calls[:3]] == [256, 256, 256]


def test_a_long_target_lets_prompts_go_faster() -> None:
    def steps(target: float) -> int:
        sched, model = make(max_step_ms=target, n_seq=3, n_batch=512)
        a = submit(sched, request("a", prompt(10, 8), 300))
        for _ in range(5):
            sched.step()
        b: Sink = submit(sched, request("b", prompt(500, 1500), 2))
        n = 0
        while not b:
            sched.step()
            n += 1
        assert a.end() is None
        return n

    assert steps(400.0) < steps(80.0)


def test_a_bad_estimate_cannot_stall_streams_at_once() -> None:
    sched, model = make(max_step_ms=100.0, n_seq=3, n_batch=512)
    stream = submit(sched, request("s", prompt(10, 8), 500))
    for _ in range(5):
        sched.step()
    sched.cost = StepCost(ms_ubatch=0.0, ms_token=0.001, ms_logits=0.0)  # "prompt tokens are free"
    newcomer = submit(sched, request("new", prompt(5000, 1500), 2))
    chunks = []
    while not newcomer:
        sched.step()
        chunks.append(sum(1 for t in model.calls[-1].tokens if 5000 <= t < 6500))
    pairs = zip(chunks, chunks[1:], strict=False)
    assert chunks[0] <= 2 * MIN_CHUNK and all(b <= 2 * max(a, MIN_CHUNK) for a, b in pairs)
    assert stream.end() is None and max(model.step_ms[-len(chunks) :]) < 1000


def test_serve_flags_reach_the_scheduler_settings() -> None:
    assert tuning(Overrides()) == Tuning()
    assert tuning(Overrides(max_step_ms=250.0, speculate=False, draft_max=3)) == Tuning(250.0, False, 3)
