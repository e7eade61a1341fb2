"""Batched embeddings: one thread owns an embeddings context; inputs from every request share its decodes.

A request queues its inputs (token lists) and waits on a future. The thread takes inputs first
come, first served, as many as one decode holds (``n_seq`` inputs, ``n_batch`` tokens), inputs of
different requests together, and decodes them in one call; a request's future completes when
its last input is pooled. It never touches the event loop and nothing else touches its context.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlserve.engine.api import EMBED_BUCKETS, GenerationFailed, Overloaded, StepStats, Unavailable

MAX_QUEUED_INPUTS = 4096  # inputs waiting across requests; beyond that, Overloaded (503)


class EmbedContext(Protocol):
    """A pooling context: one decode embeds up to ``n_seq`` inputs of ``n_batch`` tokens in all."""

    n_batch: int
    n_seq: int

    def embed(self, inputs: list[list[int]]) -> list[Any]:
        """One decode; a mean-pooled vector (a sequence of floats) per input."""
        ...

    def close(self) -> None:
        """Free the context."""
        ...


@dataclass(eq=False)
class _Job:
    inputs: list[list[int]]
    future: concurrent.futures.Future[list[list[float]]] = field(default_factory=concurrent.futures.Future)
    vectors: list[list[float]] = field(default_factory=list)
    left: int = 0


def normalised(vector: Any) -> list[float]:
    """``vector`` scaled to unit L2 length (a zero vector stays zero)."""
    values = [float(x) for x in vector]
    norm = math.sqrt(sum(x * x for x in values))
    return [x / norm for x in values] if norm > 0 else values


class EmbedWorker:
    """The embeddings thread and its queue (see the module docstring)."""

    def __init__(self, context: EmbedContext, stats: StepStats, max_queued: int = MAX_QUEUED_INPUTS) -> None:
        self.context = context
        self.stats = stats
        self.max_queued = max_queued
        self._queue: deque[tuple[_Job, int]] = deque()
        self._cv = threading.Condition()
        self._closed: str | None = None
        self._thread = threading.Thread(target=self._run, name="mlserve-embed", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def submit(self, inputs: list[list[int]]) -> concurrent.futures.Future[list[list[float]]]:
        """Queue one request's inputs (each at most ``n_batch`` tokens); its unit vectors arrive on the future."""
        job = _Job(inputs, vectors=[[] for _ in inputs], left=len(inputs))
        if not inputs:
            job.future.set_result([])
            return job.future
        with self._cv:
            if self._closed is not None:
                raise Unavailable(self._closed)
            if self._queue and len(self._queue) + len(inputs) > self.max_queued:
                waiting = len(self._queue)
                raise Overloaded(f"The embeddings queue is full ({waiting} inputs waiting); try again shortly.")
            self._queue.extend((job, i) for i in range(len(inputs)))
            self._cv.notify()
        return job.future

    def stop(self, reason: str = "The model was unloaded.") -> None:
        """Refuse new inputs, fail the queued ones, and wait for the thread to end."""
        with self._cv:
            self._closed = reason
            left = {job for job, _ in self._queue}
            self._queue.clear()
            self._cv.notify()
        for job in left:
            _fail(job, Unavailable(reason))
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and self._closed is None:
                    self._cv.wait()
                if self._closed is not None:
                    return
                items = self._take()
            if items:
                self._decode(items)

    def _take(self) -> list[tuple[_Job, int]]:
        """The next inputs in arrival order that fit one decode (a cancelled request's are dropped)."""
        items: list[tuple[_Job, int]] = []
        tokens = 0
        while self._queue and len(items) < self.context.n_seq:
            job, i = self._queue[0]
            if job.future.done():  # cancelled by its client, or failed with an earlier batch
                self._queue.popleft()
                continue
            n = len(job.inputs[i])
            if items and tokens + n > self.context.n_batch:
                break
            self._queue.popleft()
            items.append((job, i))
            tokens += n
        return items

    def _decode(self, items: list[tuple[_Job, int]]) -> None:
        try:
            vectors = self.context.embed([job.inputs[i] for job, i in items])
        except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving the others
            detail = getattr(exc, "message", None) or type(exc).__name__
            for job in {job for job, _ in items}:
                _fail(job, GenerationFailed(f"The model could not embed this request: {detail}"))
            return
        st = self.stats
        st.embed_decodes += 1
        st.embed_inputs += len(items)
        st.embed_hist[bisect.bisect_left(EMBED_BUCKETS, len(items))] += 1
        for (job, i), vector in zip(items, vectors, strict=True):
            job.vectors[i] = normalised(vector)
            job.left -= 1
            if job.left == 0:
                try:
                    job.future.set_result(job.vectors)
                except concurrent.futures.InvalidStateError:  # cancelled meanwhile
                    pass


def _fail(job: _Job, error: Exception) -> None:
    try:
        job.future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass
