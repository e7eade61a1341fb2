"""A fake engine behind the real ``Engine`` protocol, for fast in-process route tests.

It tokenises UTF-8 bytes (one token per byte, plus BOS), renders chat messages as
``role: content`` lines, and answers every request with a scripted reply, one word per token.
Knobs make it slow, fail mid-stream with an error event, raise an unexpected exception, die,
or never become ready, so every path the server must settle can be driven without llama.cpp.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from mlserve.engine.api import (
    ContextOverflow,
    EngineHealth,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
    StepStats,
    TokenEvent,
    Unavailable,
)
from mlserve.errors import EngineError

BOS = 256


@dataclass
class FakeScript:
    """How the fake engine behaves; change fields between requests to steer a test."""

    reply: str = "The patient is stable and ready for discharge."
    token_delay: float = 0.0  # seconds between tokens
    error_after: int | None = None  # send an ErrorEvent(GenerationFailed) after this many tokens
    raise_after: int | None = None  # raise RuntimeError (a bug) after this many tokens
    fail_start: bool = False  # start() raises EngineError
    start_gate: asyncio.Event | None = None  # start() waits for it (a slow load a test can hold open)
    max_active: int = 8  # sequences at once; beyond that, Overloaded
    ctx_size: int = 4096


class FakeEngine:
    """An engine that needs no model file; see the module docstring."""

    def __init__(self, model_id: str = "fake:1", script: FakeScript | None = None) -> None:
        self.model_id = model_id
        self.script = script or FakeScript()
        self.state = "loading"
        self.detail: str | None = None
        self.aborted: list[str] = []
        self.requests: list[GenerationRequest] = []
        self._stats = StepStats()
        self.closed = False

    async def start(self) -> None:
        """Become ready (after ``start_gate``, when set), or fail when scripted to."""
        if self.script.start_gate is not None:
            await self.script.start_gate.wait()
        if self.script.fail_start:
            self.state, self.detail = "failed", "scripted start failure"
            raise EngineError(f"Model {self.model_id} failed to start: scripted.")
        self.state = "ready"

    @property
    def vocab_size(self) -> int:
        """256 byte tokens and BOS."""
        return 257

    async def tokenize(self, text: str) -> list[int]:
        """BOS then the UTF-8 bytes."""
        try:
            return [BOS, *text.encode("utf-8")]
        except UnicodeEncodeError:
            raise InvalidRequest("The prompt is not valid Unicode (it holds a lone surrogate).") from None

    async def chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        """``role: content`` lines, then ``assistant:``."""
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return await self.tokenize(text)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """The scripted reply, one word per token, honouring max_tokens, stop strings and the deadline."""
        s = self.script
        if self.state != "ready":
            raise Unavailable(f"Model {self.model_id} is not ready ({self.state}).")
        if len(request.prompt_tokens) + request.sampling.max_tokens > s.ctx_size:
            raise ContextOverflow(
                f"The prompt has {len(request.prompt_tokens)} tokens; the context holds {s.ctx_size}."
            )
        if self._stats.active >= s.max_active:
            raise Overloaded("The model's queue is full; try again shortly.")
        self.requests.append(request)
        request.submitted_at = request.admitted_at = time.monotonic()
        self._stats.active += 1
        words = [w + " " for w in s.reply.split(" ")]
        words[-1] = words[-1].rstrip()
        sent = 0
        text = ""
        try:
            for word in words:
                if s.token_delay:
                    await asyncio.sleep(s.token_delay)
                if request.id in self.aborted:
                    return
                if s.error_after is not None and sent >= s.error_after:
                    yield ErrorEvent(GenerationFailed("llama_decode failed for this sequence (scripted)."))
                    return
                if s.raise_after is not None and sent >= s.raise_after:
                    raise RuntimeError("scripted bug")
                sent += 1
                text += word
                hit = next((text.find(stop) for stop in request.sampling.stop if stop in text), -1)
                if hit >= 0:
                    yield FinishEvent(
                        "stop", len(request.prompt_tokens), sent, word[: max(0, len(word) - (len(text) - hit))]
                    )
                    return
                if sent >= request.sampling.max_tokens:
                    yield FinishEvent("length", len(request.prompt_tokens), sent, word)
                    return
                if sent == len(words):
                    yield FinishEvent("stop", len(request.prompt_tokens), sent, word)
                    return
                yield TokenEvent(word, 1)
        finally:
            self._stats.active -= 1

    def abort(self, request_id: str) -> None:
        """Note the abort; the generator stops before its next token."""
        self.aborted.append(request_id)

    def health(self) -> EngineHealth:
        """The scripted state."""
        return EngineHealth(self.state == "ready", self.state, self.detail)

    def stats(self) -> StepStats | None:
        """Counters (active sequences only)."""
        return self._stats

    def begin_drain(self) -> None:
        """Report draining."""
        if self.state == "ready":
            self.state = "draining"

    async def close(self) -> None:
        """Stop."""
        self.state = "stopped"
        self.closed = True
