"""Continuous batching: one thread owns the model's context and packs every active
sequence's next token, plus chunks of newly admitted prompts, into one decode call.

Each sequence has its own KV sequence id (its slot), its own sampler chain and its own
positions; finished or cancelled sequences give their slot back at once and new requests
join between steps. Requests and aborts reach the thread through a deque, never a lock
the thread holds while it decodes, so ``submit`` returns at once whatever the thread does.

Which slot a request takes, and the prompt prefix it can reuse there, is ``slots.Slots``' job.

Deterministic requests never share a decode call: each step decodes the others' batch, then
each deterministic sequence alone (prompt in fixed ``n_batch`` chunks, then a token per step),
so the others keep going. Its slot is cleared (no prefix reuse; cells placed from the start of
its own KV stream, not ``kv_unified``), and a decode error fails it rather than retry in other
chunks: its inputs to llama.cpp, and so its bytes, are those of an idle server.

How one step's batch is packed (prompt chunks sized by a step-time target, prompt-lookup
drafts verified beside the other sequences' tokens) and how decode errors are recovered is
``batching.BatchedSteps``' job.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mlserve.engine.api import (
    DeadlineExceeded,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationFailed,
    GenerationRequest,
    Overloaded,
    RequestError,
    StepStats,
    TokenEvent,
    Unavailable,
)
from mlserve.engine.batching import FATAL_AFTER, BatchedSteps, Out, Seq, slot_of
from mlserve.engine.decode import NO_KV_SLOT, DecodeError, DecodeModel
from mlserve.engine.prefill import MIN_CHUNK, StepCost
from mlserve.engine.slots import MIN_REUSE, Slots
from mlserve.engine.speculate import Drafter
from mlserve.engine.tuning import Tuning

UNLOADED = "The model was unloaded."
Deliver = Callable[[list[tuple[Any, Event]]], None]
_SUBMIT, _ABORT, _STOP = 0, 1, 2


class Scheduler(BatchedSteps):
    """Owns the model's context on one thread; requests arrive through ``submit``."""

    def __init__(
        self,
        model: DecodeModel,
        deliver: Deliver,
        max_queue: int,
        tuning: Tuning | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model = model
        self.deliver = deliver
        self.max_queue = max_queue
        self.tuning = tuning or Tuning()
        self.cost = StepCost()  # measured cost of a decode call: sizes prompt chunks and drafts
        self._clock = clock  # injected by tests: a fake model can charge time per token without sleeping
        self.stats = StepStats()
        self.failed: str | None = None  # why the thread died (None while it lives or after a clean stop)
        self._inbox: deque[tuple[int, Any]] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards _outstanding and _closed only; never held while decoding
        self._outstanding = 0  # submitted and not yet ended
        self._closed: str | None = None  # why new requests are refused
        self._pending: deque[Seq] = deque()
        self._active: list[Seq] = []
        self._slots = Slots(model, self.stats)
        self._prefill_cap = model.n_batch  # prompt tokens per step; halved on "no KV slot", regrown after
        self._last_chunk = MIN_CHUNK  # grows chunks beside streams gradually (batching._chunks)
        self._failures_in_row = 0
        self._thread = threading.Thread(target=self._run, name="mlserve-engine", daemon=True)

    # -- any thread -----------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread.is_alive()

    def submit(self, req: GenerationRequest, sink: Any) -> None:
        """Queue a request; Overloaded when the bounded queue is full, Unavailable once stopped."""
        with self._lock:
            if self._closed is not None:
                raise Unavailable(self._closed)
            if self._outstanding >= self.model.n_seq + self.max_queue:
                waiting = self._outstanding - self.model.n_seq
                raise Overloaded(f"The model's queue is full ({waiting} waiting); try again shortly.")
            self._outstanding += 1
            req.submitted_at = time.monotonic()
            self._inbox.append((_SUBMIT, Seq(req, sink)))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Drop a request before the next step (its sink hears an error event)."""
        self._inbox.append((_ABORT, request_id))
        self._wake.set()

    def request_stop(self) -> None:
        """Refuse new requests; the thread ends the waiting ones and stops after its current step."""
        with self._lock:
            if self._closed is None:
                self._closed = UNLOADED
        self._inbox.append((_STOP, None))
        self._wake.set()

    def stop(self) -> None:
        """``request_stop`` and wait for the thread to end."""
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join()

    # -- the engine thread ----------------------------------------------------------
    def _run(self) -> None:
        reason = UNLOADED
        try:
            while True:
                self._wait_for_work()
                if not self.step():
                    break
        except Exception as exc:  # a model error or a bug: nobody may be left waiting
            detail = getattr(exc, "message", None) or type(exc).__name__
            self.failed = reason = f"The engine failed: {detail}"
        finally:
            self._teardown(reason)

    def _wait_for_work(self) -> None:
        """Sleep while there is nothing to decode and nothing has arrived."""
        while not self._active and not self._pending and not self._inbox:
            self._wake.clear()
            if self._inbox:  # arrived between the check and the clear
                return
            self._wake.wait()

    def _teardown(self, reason: str) -> None:
        with self._lock:
            if self._closed is None or self.failed:
                self._closed = reason
            # Nothing new can enter the inbox now: whatever is in it is the last of it.
            arrived = [item for kind, item in self._inbox if kind == _SUBMIT]
            self._inbox.clear()
        ended = self._active + list(self._pending) + arrived
        for seq in self._active:
            if seq.sampler is not None:
                try:
                    self.model.free_sampler(seq.sampler)
                except Exception:  # noqa: BLE001 - a broken context must not keep waiters hanging
                    pass
        self._active, self._pending = [], deque()
        self._ended(len(ended))
        self.deliver([(s.sink, ErrorEvent(Unavailable(reason))) for s in ended])

    def _ended(self, n: int) -> None:
        if n:
            with self._lock:
                self._outstanding -= n

    def step(self) -> bool:
        """One scheduling step (the thread's loop body; unit tests call it directly): False once stopped."""
        aborted: set[str] = set()
        inbox = self._inbox
        while inbox:
            kind, item = inbox.popleft()
            if kind == _SUBMIT:
                self._pending.append(item)
            elif kind == _ABORT:
                aborted.add(item)
            else:
                return False
        out: Out = []
        now = time.monotonic()
        if self._pending:
            self._drop_pending(aborted, now, out)
        for seq in list(self._active):
            if seq.req.id in aborted:
                self._fail(seq, GenerationFailed("The request was aborted."), out)
            elif seq.req.deadline is not None and now > seq.req.deadline:
                self._fail(seq, DeadlineExceeded("The request deadline passed; generation stopped."), out)
        self._admit(now)
        if self._active:
            self._decode_step(out)
        st = self.stats
        st.active = len(self._active)
        st.queued = len(self._pending)
        st.kv_cells_used = sum(s.n_past for s in self._active)
        if out:
            self.deliver(out)
        return True

    def _drop_pending(self, aborted: set[str], now: float, out: Out) -> None:
        keep: deque[Seq] = deque()
        for seq in self._pending:
            if seq.req.id in aborted:
                out.append((seq.sink, ErrorEvent(GenerationFailed("The request was aborted."))))
            elif seq.req.deadline is not None and now > seq.req.deadline:
                out.append((seq.sink, ErrorEvent(DeadlineExceeded("The request deadline passed while it was queued."))))
            else:
                keep.append(seq)
        self._ended(len(self._pending) - len(keep))
        self._pending = keep

    def _admit(self, now: float) -> None:
        while self._pending and self._slots.available():
            seq = self._pending.popleft()
            self._assign_slot(seq)
            seq.req.admitted_at = now
            self._active.append(seq)

    def _assign_slot(self, seq: Seq) -> None:
        req = seq.req
        seq.slot, reuse = self._slots.take(req.prompt_tokens, req.deterministic)
        seq.prefilled = seq.n_past = reuse
        # Deterministic requests keep their idle-server bytes; a grammar's state is not proven under drafts.
        if self.tuning.speculate and req.speculate and not req.deterministic and req.sampling.grammar is None:
            seq.spec = Drafter(list(req.prompt_tokens))

    # -- decoding ---------------------------------------------------------------------
    def _decode_step(self, out: Out) -> None:
        self._active.sort(key=slot_of)  # ascending sequence ids: one ubatch, not several
        alone = [s for s in self._active if s.req.deterministic]
        gen = [s for s in self._active if s.prefilled == len(s.req.prompt_tokens) and not s.req.deterministic]
        n = self.model.n_batch
        while len(gen) > n:  # more sequences than one batch holds (parallel > batch): several calls
            self._decode(gen[:n], 0, out, drafts=False)
            gen = gen[n:]
        self._decode(gen, self._prefill_cap, out)
        for seq in alone:
            self._decode_alone(seq, out)

    def _decode_alone(self, seq: Seq, out: Out) -> None:
        """One call for a deterministic sequence only: its next prompt chunk of n_batch tokens, or its next token."""
        prompt, start = seq.req.prompt_tokens, seq.prefilled
        tokens = prompt[start : start + self.model.n_batch] if start < len(prompt) else [seq.last]
        pos = list(range(seq.n_past, seq.n_past + len(tokens)))
        sample = start + len(tokens) >= len(prompt)
        try:
            self.model.decode(tokens, pos, [seq.slot] * len(tokens), [False] * (len(tokens) - 1) + [sample])
        except DecodeError as exc:
            if exc.rc != NO_KV_SLOT:
                self._failures_in_row += 1
                if self._failures_in_row >= FATAL_AFTER:
                    raise
            why = GenerationFailed(f"The model could not decode this request: {exc.message}")
            self._fail(seq, why, out, broken=True)  # retrying in smaller chunks would change its bytes
            return
        self._failures_in_row = 0
        self._count_step(len(tokens))
        seq.n_past += len(tokens)
        seq.prefilled = min(len(prompt), start + len(tokens))
        if sample:
            if seq.sampler is None:
                seq.sampler = self.model.new_sampler(seq.req.sampling)
            self._on_token(seq, self.model.sample(seq.sampler, len(tokens) - 1), out)

    def _on_token(self, seq: Seq, token: int, out: Out) -> None:
        seq.generated += 1
        seq.last = token
        seq.out_tokens.append(token)
        if seq.spec is not None:
            seq.spec.history.append(token)
        if self.model.is_eog(token):
            self._finish(seq, "stop", out, seq.text.flush())
            return
        text, hit = seq.text.push(self.model.piece(token))
        if hit:
            self._finish(seq, "stop", out, text)
        elif seq.generated >= seq.req.sampling.max_tokens:
            self._finish(seq, "length", out, text + seq.text.flush())
        else:
            out.append((seq.sink, TokenEvent(text, 1)))

    def _finish(self, seq: Seq, reason: str, out: Out, tail: str) -> None:
        out.append((seq.sink, FinishEvent(reason, len(seq.req.prompt_tokens), seq.generated, tail, seq.text.hit)))
        self._release(seq, keep_cells=True)

    def _fail(self, seq: Seq, error: RequestError, out: Out, *, broken: bool = False) -> None:
        """End ``seq`` with an error; ``broken``: a decode failed it, so its cells are not trusted."""
        out.append((seq.sink, ErrorEvent(error)))
        if broken:
            self.stats.sequences_failed += 1
        self._release(seq, keep_cells=not broken)

    def _release(self, seq: Seq, *, keep_cells: bool) -> None:
        if seq.sampler is not None:
            self.model.free_sampler(seq.sampler)
            seq.sampler = None
        cells = (seq.req.prompt_tokens + seq.out_tokens)[: seq.n_past] if keep_cells else None
        self._slots.give_back(seq.slot, cells)
        self._active.remove(seq)
        self._ended(1)


__all__ = ["FATAL_AFTER", "MIN_REUSE", "Scheduler", "StepStats"]
