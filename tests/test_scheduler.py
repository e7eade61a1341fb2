"""The scheduler's bookkeeping against a fake decode model: text, slots, prefixes, aborts, deadlines, errors.

Most tests call ``Scheduler.step`` directly on the test thread, so they are deterministic
and take milliseconds; a few run the real engine thread.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from mlserve.engine.api import (
    DeadlineExceeded,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationFailed,
    GenerationRequest,
    Overloaded,
    Sampling,
    TokenEvent,
    Unavailable,
)
from mlserve.engine.decode import DecodeError
from mlserve.engine.scheduler import FATAL_AFTER, MIN_REUSE, Scheduler
from tests.support.fake_decode import Call, FakeDecodeModel


class Sink(list[Event]):
    """The events one request received."""

    def text(self) -> str:
        return "".join(e.text for e in self if isinstance(e, (TokenEvent, FinishEvent)))

    def end(self) -> Event | None:
        ends = [e for e in self if isinstance(e, (FinishEvent, ErrorEvent))]
        assert len(ends) <= 1, f"more than one terminal event: {ends}"
        return ends[0] if ends else None


class Events:
    """A thread-safe deliver callback."""

    def __init__(self) -> None:
        self.cv = threading.Condition()

    def __call__(self, items: list[tuple[Any, Event]]) -> None:
        with self.cv:
            for sink, event in items:
                sink.append(event)
            self.cv.notify_all()

    def wait(self, sink: Sink, timeout: float = 10) -> Event:
        with self.cv:
            assert self.cv.wait_for(lambda: sink.end() is not None, timeout), "no terminal event"
        end = sink.end()
        assert end is not None
        return end


def make(model: FakeDecodeModel | None = None, max_queue: int = 4, **kw: Any) -> tuple[Scheduler, FakeDecodeModel]:
    model = model or FakeDecodeModel(**kw)
    return Scheduler(model, Events(), max_queue), model


def request(
    rid: str, prompt: list[int], max_tokens: int = 4, stop: tuple[str, ...] = (), **kw: Any
) -> GenerationRequest:
    return GenerationRequest(rid, prompt, Sampling(max_tokens=max_tokens, temperature=0, stop=stop), **kw)


def submit(sched: Scheduler, req: GenerationRequest) -> Sink:
    sink = Sink()
    sched.submit(req, sink)
    return sink


def run(sched: Scheduler, *sinks: Sink, limit: int = 500) -> None:
    """Step until every sink has its terminal event."""
    for _ in range(limit):
        if all(s.end() is not None for s in sinks):
            return
        assert sched.step()
    raise AssertionError("requests did not end")


def prompt(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def decoded(model: FakeDecodeModel, slot: int) -> list[int]:
    """Positions decoded successfully for a sequence id, in order."""
    return [p for c in model.calls if not c.rc for p, s in zip(c.pos, c.seqs, strict=True) if s == slot]


# -- text: stop strings and UTF-8 across pieces ---------------------------------------------
def test_stop_string_split_across_pieces() -> None:
    sched, _ = make(pieces={11: b"Hel", 12: b"lo ST", 13: b"OP now", 14: b"never"})
    sink = submit(sched, request("a", [10], max_tokens=10, stop=("STOP",)))
    run(sched, sink)
    end = sink.end()
    assert isinstance(end, FinishEvent) and end.reason == "stop" and end.completion_tokens == 3
    assert sink.text() == "Hello "
    assert [e.text for e in sink if isinstance(e, TokenEvent)] == ["Hel", "lo "]  # "ST" held back


def test_stop_string_spanning_three_pieces() -> None:
    sched, _ = make(pieces={11: b"a<", 12: b"/e", 13: b"nd", 14: b">b"})
    sink = submit(sched, request("a", [10], max_tokens=10, stop=("</end>",)))
    run(sched, sink)
    assert sink.text() == "a"
    assert isinstance(sink.end(), FinishEvent) and sink.end().reason == "stop"  # type: ignore[union-attr]


def test_partial_stop_match_is_released() -> None:
    sched, _ = make(pieces={11: b"x</", 12: b"en", 13: b"try", 14: b" </e"})
    sink = submit(sched, request("a", [10], max_tokens=4, stop=("</end>",)))
    run(sched, sink)
    assert [e.text for e in sink if isinstance(e, TokenEvent)] == ["x", "", "</entry"]
    end = sink.end()
    assert isinstance(end, FinishEvent) and end.reason == "length"
    assert sink.text() == "x</entry </e"  # the held "</e" is real output at the length limit


def test_multibyte_utf8_split_across_pieces() -> None:
    sched, _ = make(pieces={11: b"caf\xc3", 12: b"\xa9 \xe2\x82", 13: b"\xac!"})
    sink = submit(sched, request("a", [10], max_tokens=3))
    run(sched, sink)
    assert [e.text for e in sink if isinstance(e, TokenEvent)] == ["caf", "é "]
    assert sink.text() == "café €!"


def test_held_text_is_flushed_at_end_of_generation() -> None:
    sched, _ = make(pieces={11: b"ab E"}, eog=frozenset({12}))
    sink = submit(sched, request("a", [10], max_tokens=10, stop=("END",)))
    run(sched, sink)
    assert sink.text() == "ab E"


# -- slots and prefixes ---------------------------------------------------------------------
def test_prefix_reuse_picks_the_longest_shared_prefix() -> None:
    sched, model = make(n_seq=3)
    a, b = prompt(100, 30), prompt(200, 30)
    first = [submit(sched, request("a", a, 2)), submit(sched, request("b", b, 2))]
    run(sched, *first)
    assert decoded(model, 0)[:30] == list(range(30)) and decoded(model, 1)[:30] == list(range(30))
    # c shares 20 tokens with b's slot (1): it resumes there at position 20.
    model.calls.clear()
    c = b[:20] + prompt(300, 10)
    sink_c = submit(sched, request("c", c, 2))
    run(sched, sink_c)
    assert decoded(model, 1)[0] == 20
    assert sched.stats.prefix_hits == 1 and sched.stats.prefix_tokens_reused == 20
    # d's best match (c's slot, 1) is shorter than MIN_REUSE: the lowest free slot, from 0.
    model.calls.clear()
    sink_d = submit(sched, request("d", c[: MIN_REUSE - 1] + prompt(400, 10), 2))
    run(sched, sink_d)
    assert decoded(model, 0)[0] == 0 and not decoded(model, 1) and not decoded(model, 2)
    assert sched.stats.prefix_hits == 1


def test_released_slot_caches_prompt_and_generated_tokens() -> None:
    sched, model = make(n_seq=2)
    c = prompt(300, 20)
    sink = submit(sched, request("c", c, 3))
    run(sched, sink)
    # Cells hold the 20 prompt tokens and the two generated tokens fed back (the third never was).
    follow = c + [320, 321] + [7, 8]
    model.calls.clear()
    sink2 = submit(sched, request("again", follow, 1))
    run(sched, sink2)
    assert sched.stats.prefix_tokens_reused == 22
    assert decoded(model, 0)[0] == 22


# -- aborts, deadlines, queue -----------------------------------------------------------------
def test_abort_while_queued_frees_its_place() -> None:
    sched, model = make(n_seq=1, max_queue=1)
    running = submit(sched, request("run", prompt(10, 5), 50))
    queued = submit(sched, request("queued", prompt(500, 5), 5))
    sched.step()
    with pytest.raises(Overloaded):
        submit(sched, request("full", [1], 1))
    sched.abort("queued")
    sched.step()
    assert isinstance(queued.end(), ErrorEvent) and sched.stats.queued == 0
    assert all(500 not in c.tokens for c in model.calls)
    submit(sched, request("next", [1], 1))  # the queue has room again
    assert running.end() is None


@pytest.mark.parametrize("steps", [1, 5], ids=["prefilling", "decoding"])
def test_abort_frees_the_slot(steps: int) -> None:
    sched, model = make(n_seq=1, n_batch=8)
    sink = submit(sched, request("a", prompt(10, 20), 50))
    for _ in range(steps):
        sched.step()
    assert sink.end() is None
    sched.abort("a")
    after = submit(sched, request("b", prompt(600, 4), 2))
    run(sched, after)
    assert isinstance(sink.end(), ErrorEvent) and isinstance(after.end(), FinishEvent)
    assert model.live_samplers() == 0 and sched.stats.active == 0


def test_deadline_while_queued() -> None:
    sched, _ = make(n_seq=1)
    running = submit(sched, request("run", prompt(10, 5), 50))
    late = submit(sched, request("late", prompt(500, 5), 5, deadline=time.monotonic() - 1))
    sched.step()
    end = late.end()
    assert isinstance(end, ErrorEvent) and isinstance(end.error, DeadlineExceeded)
    assert running.end() is None and sched.stats.queued == 0


def test_deadline_while_running_frees_the_slot() -> None:
    sched, model = make(n_seq=1)
    req = request("a", prompt(10, 5), 50, deadline=time.monotonic() + 3600)
    sink = submit(sched, req)
    sched.step()
    sched.step()
    req.deadline = time.monotonic() - 1
    sched.step()
    end = sink.end()
    assert isinstance(end, ErrorEvent) and isinstance(end.error, DeadlineExceeded)
    assert model.live_samplers() == 0
    run(sched, submit(sched, request("b", [5], 1)))


def test_queue_full_is_overloaded() -> None:
    sched, _ = make(n_seq=2, max_queue=1)
    sinks = [submit(sched, request(f"r{i}", [10 + i], 3)) for i in range(3)]
    with pytest.raises(Overloaded):
        submit(sched, request("r3", [50], 3))
    run(sched, *sinks)
    run(sched, submit(sched, request("r4", [60], 1)))


def test_abort_after_finish_does_nothing() -> None:
    sched, model = make(n_seq=1, max_queue=0)
    first = submit(sched, request("a", [10], 2))
    run(sched, first)
    second = submit(sched, request("b", [20], 5))
    sched.abort("a")  # late: "a" is done and "b" holds its slot now
    run(sched, second)
    assert isinstance(first.end(), FinishEvent) and len(first) == 2
    assert isinstance(second.end(), FinishEvent) and second.end().completion_tokens == 5  # type: ignore[union-attr]
    run(sched, submit(sched, request("c", [30], 1)))  # counts are right: the one place is free again


def test_abort_in_the_step_it_would_finish_ends_it_once() -> None:
    sched, _ = make(n_seq=1)
    sink = submit(sched, request("a", [10], 2))
    sched.step()
    sched.abort("a")
    sched.step()
    sched.step()
    assert isinstance(sink.end(), ErrorEvent)


# -- decode errors ----------------------------------------------------------------------------
def _two_requests(model: FakeDecodeModel) -> tuple[list[str], Scheduler]:
    sched, _ = make(model)
    sinks = [submit(sched, request(f"r{i}", prompt(100 * (i + 1), 40), 6)) for i in range(2)]
    run(sched, *sinks)
    assert all(isinstance(s.end(), FinishEvent) for s in sinks)
    return [s.text() for s in sinks], sched


def test_decode_no_kv_slot_retries_with_smaller_batch() -> None:
    expected, _ = _two_requests(FakeDecodeModel(n_batch=64))
    tight = FakeDecodeModel(n_batch=64, max_tokens=10)
    texts, sched = _two_requests(tight)
    assert texts == expected
    assert sched.stats.decode_retries > 0 and sched.stats.sequences_failed == 0
    assert all(len(c.tokens) <= 10 for c in tight.calls if not c.rc)
    # Generation alone cannot fit 2 tokens: the sequences are decoded one by one.
    solo = FakeDecodeModel(n_batch=64, max_tokens=1)
    texts, sched = _two_requests(solo)
    assert texts == expected and sched.stats.sequences_failed == 0


def test_decode_error_fails_only_affected_sequences() -> None:
    # rc 1 that only one sequence triggers (its cells are full at position 12): it alone fails.
    def full(call: Call) -> int:
        return 1 if any(s == 1 and p >= 12 for s, p in zip(call.seqs, call.pos, strict=True)) else 0

    sched, model = make(n_seq=2, fail_when=full)
    ok, doomed = submit(sched, request("ok", prompt(10, 5), 20)), submit(sched, request("doomed", prompt(50, 5), 20))
    run(sched, ok, doomed)
    assert isinstance(ok.end(), FinishEvent) and ok.end().completion_tokens == 20  # type: ignore[union-attr]
    end = doomed.end()
    assert isinstance(end, ErrorEvent) and isinstance(end.error, GenerationFailed)
    assert sched.stats.sequences_failed == 1 and model.live_samplers() == 0
    assert model.cells.get(1) == []  # its cells were dropped, not cached
    # Any other code fails the sequences in that batch; a queued request then runs.
    sched, model = make(n_seq=2, fail_at={2: -3})
    a, b = submit(sched, request("a", [10], 10)), submit(sched, request("b", [20], 10))
    queued = submit(sched, request("c", [30], 3))
    run(sched, a, b, queued)
    assert isinstance(a.end(), ErrorEvent) and isinstance(b.end(), ErrorEvent)
    assert isinstance(queued.end(), FinishEvent)
    assert sched.stats.sequences_failed == 2


def test_repeated_decode_failures_are_fatal() -> None:
    sched, _ = make(n_seq=1, max_queue=FATAL_AFTER, fail_when=lambda call: -3)
    sinks = [submit(sched, request(f"r{i}", [10], 3)) for i in range(FATAL_AFTER)]
    with pytest.raises(DecodeError):
        for _ in range(FATAL_AFTER):
            sched.step()
    assert sum(isinstance(s.end(), ErrorEvent) for s in sinks) == FATAL_AFTER - 1


def test_fatal_model_error_ends_every_request_and_refuses_new_ones() -> None:
    events = Events()
    model = FakeDecodeModel(n_seq=1, raise_at={3: RuntimeError("context gone")})
    sched = Scheduler(model, events, 4)
    sched.start()
    running, queued = Sink(), Sink()
    sched.submit(request("a", [10], 50), running)
    sched.submit(request("b", [20], 5), queued)
    for sink in (running, queued):
        end = events.wait(sink)
        assert isinstance(end, ErrorEvent) and isinstance(end.error, Unavailable)
    sched.stop()
    assert not sched.alive and sched.failed is not None and "RuntimeError" in sched.failed
    with pytest.raises(Unavailable):
        sched.submit(request("c", [30], 1), Sink())


def test_submit_does_not_wait_for_a_running_decode() -> None:
    events = Events()
    model = FakeDecodeModel(n_seq=1, gate=threading.Event())
    sched = Scheduler(model, events, 4)
    sched.start()
    first = Sink()
    sched.submit(request("a", [10], 2), first)
    assert model.entered.wait(10)  # the thread is inside decode, blocked on the gate
    t0 = time.monotonic()
    second = Sink()
    sched.submit(request("b", [20], 1), second)
    sched.abort("nobody")
    assert time.monotonic() - t0 < 0.05
    assert model.gate is not None
    model.gate.set()
    assert isinstance(events.wait(first), FinishEvent) and isinstance(events.wait(second), FinishEvent)
    sched.stop()


def test_stop_ends_waiting_requests_as_unavailable() -> None:
    events = Events()
    model = FakeDecodeModel(n_seq=1, gate=threading.Event())
    sched = Scheduler(model, events, 4)
    sched.start()
    running, queued = Sink(), Sink()
    sched.submit(request("a", [10], 50), running)
    sched.submit(request("b", [20], 5), queued)
    assert model.entered.wait(10)
    sched.request_stop()  # queued behind the decode that is running
    assert model.gate is not None
    model.gate.set()
    sched.stop()
    assert isinstance(running.end(), ErrorEvent) and isinstance(queued.end(), ErrorEvent)
    assert isinstance(queued.end().error, Unavailable)  # type: ignore[union-attr]
    with pytest.raises(Unavailable):
        sched.submit(request("c", [1], 1), Sink())
