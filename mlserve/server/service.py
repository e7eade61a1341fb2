"""The protocol-neutral inference service: lookup, admission, tokens, sampling, deadline, disconnects.

A surface (OpenAI, Ollama, ...) turns its wire request into a ``Prompt`` and ``Params`` and
calls ``InferenceService.start``; it gets back a ``Generation``, an async iterator of engine
events that keeps the request context up to date (first token, usage, finish) and aborts the
engine's sequence however it is left. The surface only formats those events.
``InferenceService.embed`` is the same admission for embeddings: vectors in one answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request

from mlserve.engine.api import (
    DeadlineExceeded,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    InvalidRequest,
    Sampling,
    TokenEvent,
    Unavailable,
)
from mlserve.server.auditing import prompt_sha256
from mlserve.server.context import RequestContext, content_log
from mlserve.server.errors import ClientGone
from mlserve.server.state import ServedModel, ServerState


@dataclass(frozen=True)
class Prompt:
    """What to generate from: chat messages, a text prompt, or token ids (exactly one)."""

    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    token_ids: list[int] | None = None

    def as_received(self) -> Any:
        """The prompt as the client sent it (hashed for the audit log, logged only with --log-content)."""
        return self.messages if self.messages is not None else self.text if self.text is not None else self.token_ids


@dataclass(frozen=True)
class Params:
    """Sampling a client asked for; None means the model's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    deterministic: bool = False  # decoded alone, so the same request gives the same bytes under any load
    speculate: bool = True  # prompt-lookup drafts may be verified (``"mlserve": {"speculate": false}``: not)
    # A JSON Schema the output must match, enforced by a grammar (never ignored: a schema the grammar
    # cannot enforce is a 400 naming the keyword). {"type": "object"} means any JSON object.
    json_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class Embeddings:
    """Mean-pooled, L2-normalised vectors, one per input in order, and the tokens they took."""

    vectors: list[list[float]]
    prompt_tokens: int


class InferenceService:
    """Everything a surface needs from the server, and nothing about any wire format."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    def lookup(self, ctx: RequestContext, name: str) -> ServedModel:
        """The model a client asked for (never a fallback); noted in the context."""
        model = self.state.lookup(name)
        ctx.model = model
        return model

    async def admit(self, ctx: RequestContext, model_name: str, received: Any, what: str = "prompt") -> ServedModel:
        """Hash (and, with --log-content, log) what the client sent, find its model and count it in flight.

        From here a drain or a version switch waits for the request; a draining server or a model
        that is not ready refuses it (Unavailable).
        """
        state = self.state
        ctx.prompt_sha256 = await asyncio.to_thread(prompt_sha256, received)
        if state.guard.log_content:
            content_log.info("request %s %s=%s", ctx.id, what, json.dumps(received, ensure_ascii=False))
        model = self.lookup(ctx, model_name)
        ctx.admit(model, state)
        if state.draining:
            raise Unavailable("The server is shutting down; send the request to another instance.")
        health = model.engine.health()
        if not health.ready:
            raise Unavailable(f"Model {model.id} is not ready ({health.state}).")
        return model

    async def count_tokens(self, ctx: RequestContext, model_name: str, messages: list[dict[str, Any]]) -> int:
        """The prompt tokens ``messages`` make under the model's chat template (admitted like a generation)."""
        model = await self.admit(ctx, model_name, messages)
        ctx.prompt_tokens = len(await model.engine.chat_tokens(messages))
        return ctx.prompt_tokens

    async def start(
        self, request: Request, ctx: RequestContext, model_name: str, prompt: Prompt, params: Params
    ) -> Generation:
        """Admit, tokenise and submit one generation; return once its first event is in."""
        state = self.state
        model = await self.admit(ctx, model_name, prompt.as_received())
        if state.guard.log_content:
            ctx.completion = []
        schema = params.json_schema
        grammar = await model.engine.schema_grammar(schema) if schema is not None else None
        tokens = await self._tokens(model, prompt)
        sampling, explicit = self.sampling(model, params)
        if grammar is not None:
            sampling = replace(sampling, grammar=grammar)
        ctx.sampling = sampling
        ctx.deterministic = params.deterministic
        timeout = state.settings.request_timeout
        deadline = time.monotonic() + timeout if timeout else None
        # The engine's id is unique even when clients reuse an x-request-id, so an abort hits one request.
        req = GenerationRequest(
            f"{ctx.id}.{uuid.uuid4().hex[:8]}",
            tokens,
            sampling,
            explicit,
            deadline,
            params.deterministic,
            speculate=params.speculate,
        )
        generation = Generation(request, ctx, model, req, state)
        await generation.begin()
        return generation

    async def embed(
        self, request: Request, ctx: RequestContext, model_name: str, inputs: list[str], dimensions: int | None = None
    ) -> Embeddings:
        """Admit one embeddings request and answer it; ``dimensions`` keeps the first N, re-normalised."""
        state = self.state
        model = await self.admit(ctx, model_name, inputs, what="input")
        if not inputs:
            raise InvalidRequest("At least one input is required.")
        if dimensions is not None and dimensions < 1:
            raise InvalidRequest("dimensions must be at least 1.")
        try:
            vectors, tokens = await asyncio.wait_for(model.engine.embed(inputs), state.settings.request_timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded("The request deadline passed before the embeddings were ready.") from None
        ctx.prompt_tokens, ctx.completion_tokens = tokens, 0
        if dimensions is not None:
            size = len(vectors[0]) if vectors else 0
            if dimensions > size:
                raise InvalidRequest(f"dimensions is {dimensions}, but this model's embeddings have {size}.")
            vectors = [_unit(v[:dimensions]) for v in vectors]
        ctx.finished = True
        return Embeddings(vectors, tokens)

    async def _tokens(self, model: ServedModel, prompt: Prompt) -> list[int]:
        engine = model.engine
        if prompt.messages is not None:
            return await engine.chat_tokens(prompt.messages)
        if prompt.token_ids is not None:
            if any(t < 0 or t >= engine.vocab_size for t in prompt.token_ids):
                raise InvalidRequest("Prompt token ids must be non-negative integers in the vocabulary.")
            return list(prompt.token_ids)
        return await engine.tokenize(prompt.text or "")

    def sampling(self, model: ServedModel, p: Params) -> tuple[Sampling, bool]:
        """The effective sampling: the request's, else the bundle's default, else ours; max_tokens capped."""
        d = model.defaults
        cap = self.state.settings.max_tokens_cap
        explicit = p.max_tokens is not None
        chosen = p.max_tokens if p.max_tokens is not None else int(d.get("max_tokens", 512))
        if cap is not None and chosen > cap:
            if explicit:
                raise InvalidRequest(f"max_tokens is {chosen}, above this server's limit of {cap}.")
            chosen = cap
        stops = p.stop + tuple(s for s in model.stop if s not in p.stop)

        def pick(value: float | None, name: str, default: float) -> Any:
            return value if value is not None else d.get(name, default)

        sampling = Sampling(
            max_tokens=chosen,
            temperature=float(pick(p.temperature, "temperature", 0.8)),
            top_k=int(pick(p.top_k, "top_k", 40)),
            top_p=float(pick(p.top_p, "top_p", 0.95)),
            min_p=float(pick(p.min_p, "min_p", 0.05)),
            repeat_penalty=float(pick(p.repeat_penalty, "repeat_penalty", 1.0)),
            frequency_penalty=float(pick(p.frequency_penalty, "frequency_penalty", 0.0)),
            presence_penalty=float(pick(p.presence_penalty, "presence_penalty", 0.0)),
            seed=p.seed,
            stop=stops,
        )
        return sampling, explicit


class Generation:
    """One running generation: its events, kept in step with the request context."""

    def __init__(
        self, request: Request, ctx: RequestContext, model: ServedModel, req: GenerationRequest, state: ServerState
    ) -> None:
        self.request, self.ctx, self.model, self.req, self.state = request, ctx, model, req, state
        self._events = model.engine.generate(req)
        self._first: Event | None = None
        self._closed = False

    async def begin(self) -> None:
        """Wait for the first event, unless the client leaves while the request is queued or in prefill."""
        try:
            first = await self._first_event()
        except BaseException:  # refused, failed, client gone or cancelled: the sequence must not live on
            await self.aclose()
            raise
        if self.req.admitted_at:
            wait = max(0.0, self.req.admitted_at - self.req.submitted_at)
            self.state.metrics.queue_wait.labels(self.model.id).observe(wait)
        if isinstance(first, ErrorEvent):
            await self.aclose()
            raise first.error
        self.ctx.generating = True
        self.ctx.sampling = self.req.sampling  # as the engine settled it (an implicit max_tokens fitted)
        # The output's sha256 for the audit record, hashed as it streams: the text is never kept.
        self.ctx.output_hash = hashlib.sha256()
        self._first = first

    async def _first_event(self) -> Event:
        nxt = asyncio.ensure_future(self._events.__anext__())
        watch = asyncio.ensure_future(disconnected(self.request))
        try:
            await asyncio.wait({nxt, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not nxt.done():
                nxt.cancel()  # the engine's generator aborts its sequence as it unwinds
                await asyncio.gather(nxt, return_exceptions=True)
        if nxt.cancelled():
            raise ClientGone("The client disconnected before the first token.")
        return nxt.result()

    async def __aiter__(self) -> AsyncIterator[TokenEvent | FinishEvent | ErrorEvent]:
        """Every event, the first one included; stops after a finish or an error event."""
        try:
            event = self._first
            while event is not None:
                self._note(event)
                yield event
                if isinstance(event, (FinishEvent, ErrorEvent)):
                    return
                event = await self._events.__anext__()
        finally:
            await self.aclose()

    def _note(self, event: Event) -> None:
        ctx = self.ctx
        if isinstance(event, ErrorEvent):
            return
        if ctx.prompt_tokens is None:
            self.state.metrics.ttft.labels(self.model.id).observe(time.monotonic() - ctx.started)
            ctx.prompt_tokens = len(self.req.prompt_tokens)
        if event.text:
            if ctx.output_hash is not None:
                ctx.output_hash.update(event.text.encode("utf-8", "surrogatepass"))
            if ctx.completion is not None:
                ctx.completion.append(event.text)
        if isinstance(event, FinishEvent):
            ctx.prompt_tokens, ctx.completion_tokens = event.prompt_tokens, event.completion_tokens
            ctx.finished = True

    async def collect(self) -> tuple[str, FinishEvent]:
        """The whole text, stopping generation if the client goes away (ClientGone) or it fails."""

        async def gather() -> tuple[str, FinishEvent]:
            parts: list[str] = []
            async for ev in self:
                if isinstance(ev, ErrorEvent):
                    raise ev.error
                parts.append(ev.text)
                if isinstance(ev, FinishEvent):
                    return "".join(parts), ev
            raise Unavailable("The engine stopped without finishing the request.")

        work = asyncio.ensure_future(gather())
        watch = asyncio.ensure_future(disconnected(self.request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                await self.aclose()
        if work.cancelled():
            raise ClientGone("The client disconnected before the answer was complete.")
        return work.result()

    async def aclose(self) -> None:
        """Stop the engine's sequence if it is still running (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if not self.ctx.finished:
            self.model.engine.abort(self.req.id)
        closer = getattr(self._events, "aclose", None)
        if closer is not None:
            await closer()


def _unit(vector: list[float]) -> list[float]:
    """``vector`` scaled to unit length (OpenAI's ``dimensions``: shortened, then normalised again)."""
    norm = sum(x * x for x in vector) ** 0.5
    return [x / norm for x in vector] if norm > 0 else vector


async def disconnected(request: Request) -> None:
    """Return once the client has gone away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def service_of(request: Request) -> InferenceService:
    """The inference service the app was created with (``app.state.service``)."""
    service: InferenceService = request.app.state.service
    return service
