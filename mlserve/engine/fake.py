"""A fake engine behind the real ``Engine`` protocol, for fast in-process route tests.

It tokenises UTF-8 bytes (one token per byte, plus BOS), renders chat messages as
``role: content`` lines, and answers every request with a scripted reply, one word per token.
A JSON Schema is checked by the real ``check_schema`` (the grammar is its plain form as text);
embeddings are hashed byte-bigram counts, L2-normalised, all of a request's inputs in one "decode".
Knobs make it slow, fail mid-stream with an error event, raise an unexpected exception, die,
or never become ready, so every path the server must settle can be driven without llama.cpp.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from mlserve.engine.api import (
    EMBED_BUCKETS,
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
from mlserve.engine.schema import check_schema
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
    embeddings: bool = True  # served with --embeddings
    embed_ctx: int = 512  # longest embeddings input, tokens
    embed_dim: int = 64


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
                found = next((stop for stop in request.sampling.stop if stop in text), None)
                if found is not None:
                    hit = text.find(found)
                    cut = word[: max(0, len(word) - (len(text) - hit))]
                    yield FinishEvent("stop", len(request.prompt_tokens), sent, cut, found)
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

    async def schema_grammar(self, schema: dict[str, Any]) -> str:
        """The checked schema's plain form as the "grammar" (InvalidRequest as the real engine refuses)."""
        return "fake-grammar " + json.dumps(check_schema(schema), sort_keys=True)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Deterministic unit vectors (hashed byte bigrams): texts sharing words are close."""
        s = self.script
        if not s.embeddings:
            raise InvalidRequest(f"Model {self.model_id} is not served with embeddings; start with --embeddings.")
        if self.state != "ready":
            raise Unavailable(f"Model {self.model_id} is not ready ({self.state}).")
        vectors, total = [], 0
        for i, text in enumerate(texts):
            tokens = await self.tokenize(text)
            if len(tokens) > s.embed_ctx:
                limit = s.embed_ctx
                raise ContextOverflow(f"Input {i} has {len(tokens)} tokens; the embeddings context holds {limit}.")
            total += len(tokens)
            vec = [0.0] * s.embed_dim
            data = text.lower().encode("utf-8")
            for a, b in zip(data, data[1:], strict=False):
                vec[hashlib.blake2s(bytes((a, b)), digest_size=2).digest()[0] % s.embed_dim] += 1.0
            norm = math.sqrt(sum(x * x for x in vec)) or 1.0
            vectors.append([x / norm for x in vec])
        st = self._stats
        st.embed_decodes += 1
        st.embed_inputs += len(texts)
        st.embed_hist[bisect.bisect_left(EMBED_BUCKETS, len(texts))] += 1
        return vectors, total

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
