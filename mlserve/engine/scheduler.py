"""Continuous batching: one thread owns the llama.cpp context and packs every active
sequence's next token, plus chunks of newly admitted prompts, into one llama_decode.

Each sequence has its own KV sequence id (its slot), its own native sampler chain and
its own positions; finished or cancelled sequences give their slot back at once and new
requests join between steps.

Prefix reuse: a free slot keeps the tokens it last held. A new request takes the free
slot whose cached tokens share the longest prefix with its prompt, drops the cells after
that prefix and decodes only the rest. On sliding-window models (Gemma 3) cells older
than the window are gone once a sequence runs past it; llama_memory_seq_pos_min tells
whether the prefix is still whole, and if not the slot is cleared and the prompt
decoded in full.
"""

from __future__ import annotations

import bisect
import codecs
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlserve.engine.base import (
    DeadlineExceeded,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    Overloaded,
    RequestError,
    TokenEvent,
)
from mlserve.engine.llama_model import LlamaModel
from mlserve.errors import EngineError

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # tokens per llama_decode, for the histogram
MIN_REUSE = 16  # shared prompt tokens that make a slot worth choosing over the lowest free one
Deliver = Callable[[list[tuple[Any, Event]]], None]


@dataclass
class StepStats:
    """Counters the metrics endpoint reads (plain ints: reads need no lock)."""

    active: int = 0
    queued: int = 0
    last_batch_tokens: int = 0
    kv_cells_used: int = 0
    steps: int = 0
    batch_tokens_total: int = 0
    # batch_hist[i]: steps whose batch had at most BATCH_BUCKETS[i] tokens (last slot: more)
    batch_hist: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BUCKETS) + 1))
    prefix_hits: int = 0
    prefix_tokens_reused: int = 0


class _Seq:
    """The scheduler's state for one request."""

    __slots__ = (
        "req",
        "sink",
        "slot",
        "prefilled",
        "n_past",
        "last",
        "generated",
        "sampler",
        "utf8",
        "held",
        "cancel",
        "out_tokens",
    )

    def __init__(self, req: GenerationRequest, sink: Any) -> None:
        self.req = req
        self.sink = sink
        self.slot = -1
        self.prefilled = 0
        self.n_past = 0
        self.last = -1
        self.generated = 0
        self.sampler: Any = None
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.held = ""
        self.cancel = False
        self.out_tokens: list[int] = []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _stop_split(text: str, stops: tuple[str, ...]) -> tuple[str, str, bool]:
    """Split held text into (emit now, keep holding, hit a stop)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[: min(hits)], "", True
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return text[: len(text) - keep], text[len(text) - keep :], False


class Scheduler:
    """Owns the model's context on one thread; requests arrive through ``submit``."""

    def __init__(self, model: LlamaModel, deliver: Deliver, max_queue: int) -> None:
        self.model = model
        self.deliver = deliver
        self.max_queue = max_queue
        self.stats = StepStats()
        self.failed: str | None = None
        self._pending: deque[_Seq] = deque()
        self._aborted: set[str] = set()
        self._cv = threading.Condition()
        self._stopping = False
        self._active: list[_Seq] = []
        self._free = list(range(model.n_seq - 1, -1, -1))
        self._cached: dict[int, list[int]] = {}  # free slot -> tokens still in its KV cells
        self._thread = threading.Thread(target=self._run, name="mlserve-engine", daemon=True)

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def submit(self, req: GenerationRequest, sink: Any) -> None:
        """Queue a request; raise Overloaded when the bounded queue is full."""
        with self._cv:
            if self.failed is not None:
                raise Overloaded(self.failed)
            if self._stopping:
                raise Overloaded("The model is being unloaded.")
            waiting = len(self._pending)
            if waiting >= self.max_queue and self.model.n_seq - len(self._free) + waiting >= self.model.n_seq:
                raise Overloaded(f"The model's queue is full ({waiting} waiting); try again shortly.")
            req.submitted_at = time.monotonic()
            self._pending.append(_Seq(req, sink))
            self.stats.queued = len(self._pending)
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        """Ask the thread to drop a request before its next step."""
        with self._cv:
            self._aborted.add(request_id)
            self._cv.notify()

    def stop(self) -> None:
        """Stop the thread (after the current step) and wait for it."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join()

    # -- the engine thread -------------------------------------------------------
    def _run(self) -> None:
        reason = "The model was unloaded."
        try:
            while self._step():
                pass
        except EngineError as exc:
            self.failed = reason = f"The engine failed: {exc.message}"
        except Exception as exc:  # a bug must not leave requests waiting forever
            self.failed = reason = f"The engine failed ({type(exc).__name__})."
        finally:
            # Whoever is still waiting hears that it is over: nothing is left to hang.
            with self._cv:
                self._stopping = True
                waiting = list(self._active) + list(self._pending)
                self._pending.clear()
            for seq in self._active:
                if seq.sampler is not None:
                    self.model.free_sampler(seq.sampler)
            self.deliver([(s.sink, ErrorEvent(Overloaded(reason))) for s in waiting])

    def _admit(self) -> tuple[set[str], bool]:
        with self._cv:
            while not self._stopping and not self._pending and not self._active and not self._aborted:
                self._cv.wait()
            if self._stopping:
                return set(), False
            aborted, self._aborted = self._aborted, set()
            for seq in self._pending:
                if seq.req.id in aborted:
                    seq.cancel = True
            while self._pending and self._free:
                seq = self._pending.popleft()
                if seq.cancel:
                    continue
                self._assign_slot(seq)
                seq.req.admitted_at = time.monotonic()
                self._active.append(seq)
            if any(s.cancel for s in self._pending):
                self._pending = deque(s for s in self._pending if not s.cancel)
            self.stats.queued = len(self._pending)
        return aborted, True

    def _assign_slot(self, seq: _Seq) -> None:
        """Give ``seq`` the free slot sharing the longest prompt prefix; keep only that prefix."""
        prompt = seq.req.prompt_tokens
        shared = {slot: _common_prefix(self._cached.get(slot, []), prompt) for slot in self._free}
        # Longest shared prefix first; on a tie, a slot with nothing cached, so other caches live on.
        slot = max(self._free, key=lambda s: (shared[s], s not in self._cached, -s))
        if shared[slot] < MIN_REUSE:
            # Nothing worth reusing: take the lowest free slot, so active sequence ids stay
            # dense (llama.cpp's per-sequence KV streams batch only consecutive ids together).
            slot = min(self._free)
        self._free.remove(slot)
        self._cached.pop(slot, None)
        reuse = min(shared[slot], len(prompt) - 1)
        if reuse > 0 and self.model.clear_seq(slot, reuse) and self._prefix_whole(slot, reuse):
            seq.prefilled = seq.n_past = reuse
            self.stats.prefix_hits += 1
            self.stats.prefix_tokens_reused += reuse
        else:
            self.model.clear_seq(slot)
        seq.slot = slot

    def _prefix_whole(self, slot: int, reuse: int) -> bool:
        """Whether every cell the next token attends to is still cached (sliding windows prune)."""
        pos_min = self.model.seq_pos_min(slot)
        return 0 <= pos_min <= max(0, reuse - self.model.n_swa) if self.model.n_swa > 0 else pos_min == 0

    def _step(self) -> bool:
        aborted, running = self._admit()
        if not running:
            return False
        out: list[tuple[Any, Event]] = []
        now = time.monotonic()
        self._expire_pending(now, out)
        for seq in list(self._active):
            if seq.req.id in aborted:
                self._release(seq)
            elif seq.req.deadline is not None and now > seq.req.deadline:
                self._release(seq)
                out.append((seq.sink, ErrorEvent(DeadlineExceeded("The request deadline passed; generation stopped."))))
        if self._active:
            self._decode_step(out)
        if out:
            self.deliver(out)
        return True

    def _expire_pending(self, now: float, out: list[tuple[Any, Event]]) -> None:
        with self._cv:
            expired = [s for s in self._pending if s.req.deadline is not None and now > s.req.deadline]
            if expired:
                self._pending = deque(s for s in self._pending if s not in expired)
        for seq in expired:
            out.append((seq.sink, ErrorEvent(DeadlineExceeded("The request deadline passed while it was queued."))))

    def _decode_step(self, out: list[tuple[Any, Event]]) -> None:
        m = self.model
        self._active.sort(key=lambda s: s.slot)  # ascending sequence ids: one ubatch, not several
        tokens: list[int] = []
        pos: list[int] = []
        seqs: list[int] = []
        want: list[bool] = []
        sample_at: list[tuple[_Seq, int]] = []
        for seq in self._active:
            if seq.prefilled == len(seq.req.prompt_tokens):
                tokens.append(seq.last)
                pos.append(seq.n_past)
                seqs.append(seq.slot)
                want.append(True)
                sample_at.append((seq, len(tokens) - 1))
        budget = m.n_batch - len(tokens)
        prefill: list[tuple[_Seq, int]] = []
        for seq in self._active:
            remaining = len(seq.req.prompt_tokens) - seq.prefilled
            if remaining <= 0 or budget <= 0:
                continue
            take = min(budget, remaining)
            start = seq.prefilled
            tokens.extend(seq.req.prompt_tokens[start : start + take])
            pos.extend(range(start, start + take))
            seqs.extend([seq.slot] * take)
            want.extend([False] * take)
            if take == remaining:
                want[-1] = True
                sample_at.append((seq, len(tokens) - 1))
            prefill.append((seq, take))
            budget -= take
        m.decode(tokens, pos, seqs, want)
        st = self.stats
        st.steps += 1
        st.last_batch_tokens = len(tokens)
        st.batch_tokens_total += len(tokens)
        st.batch_hist[bisect.bisect_left(BATCH_BUCKETS, len(tokens))] += 1
        for seq, take in prefill:
            seq.prefilled += take
            seq.n_past += take
        for seq, _ in sample_at:
            if seq.generated > 0:
                seq.n_past += 1
        for seq, index in sample_at:
            if seq.sampler is None:
                seq.sampler = m.new_sampler(seq.req.sampling)
            self._on_token(seq, m.sample(seq.sampler, index), out)
        st.active = len(self._active)
        st.kv_cells_used = sum(s.n_past for s in self._active)

    def _on_token(self, seq: _Seq, token: int, out: list[tuple[Any, Event]]) -> None:
        seq.generated += 1
        seq.last = token
        seq.out_tokens.append(token)
        if self.model.is_eog(token):
            self._finish(seq, "stop", out, flush=True)
            return
        text = seq.utf8.decode(self.model.piece(token))
        stops = seq.req.sampling.stop
        if stops:
            emit, seq.held, hit = _stop_split(seq.held + text, stops)
            if hit:
                seq.held = ""
                self._finish(seq, "stop", out, emit)
                return
            text = emit
        if seq.generated >= seq.req.sampling.max_tokens:
            self._finish(seq, "length", out, text, flush=True)
            return
        out.append((seq.sink, TokenEvent(text, 1)))

    def _finish(
        self, seq: _Seq, reason: str, out: list[tuple[Any, Event]], text: str = "", flush: bool = False
    ) -> None:
        # flush: text held back (a possible stop-string start, a split UTF-8 character) is real output.
        tail = text + seq.held + seq.utf8.decode(b"", final=True) if flush else text
        out.append((seq.sink, FinishEvent(reason, len(seq.req.prompt_tokens), seq.generated, tail)))
        self._release(seq)

    def _release(self, seq: _Seq) -> None:
        if seq.sampler is not None:
            self.model.free_sampler(seq.sampler)
            seq.sampler = None
        # The slot keeps its cells: the next request with the same prefix reuses them.
        self._cached[seq.slot] = (seq.req.prompt_tokens + seq.out_tokens)[: seq.n_past]
        self._active.remove(seq)
        self._free.append(seq.slot)
        self.stats.active = len(self._active)


__all__ = ["Scheduler", "StepStats", "RequestError"]
