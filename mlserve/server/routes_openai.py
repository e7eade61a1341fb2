"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from mlserve.engine.base import (
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    Overloaded,
    RequestError,
    Sampling,
)
from mlserve.server import sse
from mlserve.server.auditing import RequestAudit
from mlserve.server.schemas import ChatRequest, CompletionRequest, _Sampling, describe_validation
from mlserve.server.state import ServedModel, ServerState
from mlserve.server.tracking import Tracker, request_id

log = logging.getLogger("mlserve.server")


class BodyTooLarge(RequestError):
    """The request body exceeds the limit."""

    status = 413
    code = "body_too_large"


async def list_models(request: Request) -> JSONResponse:
    """GET /v1/models: NAME and NAME:VERSION for each served model."""
    state: ServerState = request.app.state.mlserve
    data = [
        {
            "id": ident,
            "object": "model",
            "created": m.created,
            "owned_by": "mlserve",
            "version": m.version,
            "digest": m.digest,
            "ready": m.engine.health().ready,
            **state.canary_of(ident),
        }
        for ident, m in state.public_ids()
    ]
    return JSONResponse({"object": "list", "data": data})


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"The request body is larger than the {limit}-byte limit.")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"The request body is larger than the {limit}-byte limit.")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise RequestError("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    return body


def _sampling(body: _Sampling, model: ServedModel, max_tokens: int | None, cap: int | None) -> tuple[Sampling, bool]:
    d = model.defaults
    explicit = max_tokens is not None
    chosen = max_tokens if max_tokens is not None else int(d.get("max_tokens", 512))
    if cap is not None and chosen > cap:
        if explicit:
            raise RequestError(f"max_tokens is {chosen}, above this server's limit of {cap}.")
        chosen = cap
    stops = tuple(body.stop or ()) + tuple(s for s in model.stop if s not in (body.stop or ()))

    def pick(name: str, default: float) -> Any:
        value = getattr(body, name)
        return value if value is not None else d.get(name, default)

    return (
        Sampling(
            max_tokens=chosen,
            temperature=float(pick("temperature", 0.8)),
            top_k=int(pick("top_k", 40)),
            top_p=float(pick("top_p", 0.95)),
            min_p=float(pick("min_p", 0.05)),
            repeat_penalty=float(pick("repeat_penalty", 1.0)),
            frequency_penalty=float(pick("frequency_penalty", 0.0)),
            presence_penalty=float(pick("presence_penalty", 0.0)),
            seed=body.seed,
            stop=stops,
        ),
        explicit,
    )


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions."""
    return await _handle(request, "chat")


async def completions(request: Request) -> Response:
    """POST /v1/completions."""
    return await _handle(request, "completion")


async def _handle(request: Request, kind: str) -> Response:
    state: ServerState = request.app.state.mlserve
    rid = request_id(request)
    route = request.url.path
    started = time.monotonic()
    audit = RequestAudit(request.scope, rid, route)
    model: ServedModel | None = None
    try:
        body_raw = await _read_json(request, state.settings.max_body_bytes)
        audit.prompt(body_raw)
        try:
            body: ChatRequest | CompletionRequest = (
                ChatRequest.model_validate(body_raw) if kind == "chat" else CompletionRequest.model_validate(body_raw)
            )
        except ValidationError as exc:
            raise RequestError(describe_validation(exc)) from None
        model = state.lookup(body.model)
        # From here on the request counts as in flight: a drain or a channel switch waits for it.
        model.in_flight += 1
        state.in_flight += 1
        state.metrics.in_flight.labels(model.id).inc()
        if state.draining:
            raise Overloaded("The server is shutting down; send the request to another instance.")
        health = model.engine.health()
        if not health.ready:
            raise Overloaded(f"Model {model.id} is not ready ({health.state}).")
        gen_req = _build(body, model, state, rid)
        generator = model.engine.generate(gen_req)
        first = await _first_event(request, generator)
        if isinstance(first, ErrorEvent):
            raise first.error
    except Exception as exc:
        from mlserve.server.app import map_error

        response = map_error(exc, state.settings.retry_after)
        _headers(response, rid, model)
        audit.finish(response.status_code, model)
        if model is not None:
            model.in_flight -= 1
            state.in_flight -= 1
            state.metrics.in_flight.labels(model.id).dec()
        state.metrics.requests.labels(model.id if model else "", route, str(response.status_code)).inc()
        log.info("request %s %s status=%d", rid, route, response.status_code)
        return response
    tracker = Tracker(state, model, route, rid, started, gen_req, audit)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(kind, first, generator, tracker, include_usage)
        response = _SSEResponse(stream, tracker)
    else:
        response = await _collect(request, kind, first, generator, tracker)
    _headers(response, rid, model)
    return response


class ClientGone(RequestError):
    """The client disconnected before the first token."""

    status = 499
    code = "client_closed_request"


async def _first_event(request: Request, generator: AsyncIterator[Event]) -> Event:
    """The first event, unless the client leaves while the request is queued or in prefill."""
    nxt = asyncio.ensure_future(generator.__anext__())
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({nxt, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not nxt.done():
        nxt.cancel()  # the engine's generator aborts its sequence as it unwinds
        raise ClientGone("The client disconnected before the first token.")
    return nxt.result()


def _build(
    body: ChatRequest | CompletionRequest, model: ServedModel, state: ServerState, rid: str
) -> GenerationRequest:
    engine = model.engine
    if isinstance(body, ChatRequest):
        tokens = engine.chat_tokens(body.template_messages())
        max_tokens = body.max_completion_tokens or body.max_tokens
    else:
        prompt = body.prompt_text()
        if isinstance(prompt, list):
            if any(t < 0 or t >= engine.vocab_size for t in prompt):
                raise RequestError("Prompt token ids must be non-negative integers in the vocabulary.")
            tokens = prompt
        else:
            tokens = engine.tokenize(prompt)
        max_tokens = body.max_tokens
    sampling, explicit = _sampling(body, model, max_tokens, state.settings.max_tokens_cap)
    timeout = state.settings.request_timeout
    deadline = time.monotonic() + timeout if timeout else None
    # The engine's id is unique even when clients reuse an x-request-id, so an abort hits one request.
    return GenerationRequest(f"{rid}.{uuid.uuid4().hex[:8]}", tokens, sampling, explicit, deadline)


def _headers(response: Response, rid: str, model: ServedModel | None) -> None:
    response.headers["x-request-id"] = rid
    if model is not None:
        response.headers["x-mlserve-model"] = model.id


def _usage(fin: FinishEvent) -> dict[str, int]:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }


async def _events(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    yield first
    if isinstance(first, (FinishEvent, ErrorEvent)):
        return
    async for event in rest:
        yield event


async def _collect(request: Request, kind: str, first: Event, rest: AsyncIterator[Event], tracker: Tracker) -> Response:
    """Gather a whole completion, stopping generation if the client goes away."""

    async def gather() -> tuple[str, FinishEvent]:
        parts: list[str] = []
        async for ev in _events(first, rest):
            if isinstance(ev, ErrorEvent):
                raise ev.error
            tracker.token()
            parts.append(ev.text)
            if isinstance(ev, FinishEvent):
                return "".join(parts), ev
        raise RuntimeError("event stream ended without a finish event")

    work = asyncio.ensure_future(gather())
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        tracker.model.engine.abort(tracker.req.id)
        tracker.finish(499, None)
        return Response(status_code=499)
    try:
        text, fin = work.result()
    except RequestError as exc:
        from mlserve.server.app import map_error

        tracker.finish(exc.status, None)
        return map_error(exc, tracker.state.settings.retry_after)
    if tracker.audit is not None:
        tracker.audit.completion(text)
    tracker.finish(200, fin)
    created = int(time.time())
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": fin.reason,
            "logprobs": None,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": fin.reason, "logprobs": None}
        obj = "text_completion"
    body = {
        "id": ("chatcmpl-" if kind == "chat" else "cmpl-") + tracker.rid,
        "object": obj,
        "created": created,
        "model": tracker.model.id,
        "choices": [choice],
        "usage": _usage(fin),
    }
    return JSONResponse(body)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _SSEResponse(StreamingResponse):
    """A stream that always settles its request, even if the client left before it began."""

    def __init__(self, stream: AsyncIterator[bytes], tracker: Tracker) -> None:
        super().__init__(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._stream = stream
        self._tracker = tracker

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._stream, "aclose", None)
            if aclose is not None:
                await aclose()
            if not self._tracker.done:  # never started: free the sequence and the in-flight count
                self._tracker.model.engine.abort(self._tracker.req.id)
                self._tracker.finish(499, None)


async def _stream(
    kind: str, first: Event, rest: AsyncIterator[Event], tracker: Tracker, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE chunks in OpenAI's shape; the generation stops if the client disconnects."""
    created = int(time.time())
    ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + tracker.rid
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    base = {"id": ident, "object": obj, "created": created, "model": tracker.model.id}

    def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return sse.event({**base, "choices": [choice]})

    status, fin = 200, None
    try:
        if kind == "chat":
            yield chunk(None, None, role=True)
        async for ev in _events(first, rest):
            if isinstance(ev, ErrorEvent):
                status = ev.error.status
                err = {"message": ev.error.message, "type": ev.error.kind, "code": ev.error.code}
                yield sse.event({"error": err})
                break
            tracker.token()
            if isinstance(ev, FinishEvent):
                fin = ev
                if ev.text:
                    yield chunk(ev.text, None)
                yield chunk(None, ev.reason)
                if include_usage:
                    yield sse.event({**base, "choices": [], "usage": _usage(ev)})
                break
            if ev.text:
                yield chunk(ev.text, None)
        yield sse.DONE
    finally:
        if fin is None and status == 200:
            status = 499
            tracker.model.engine.abort(tracker.req.id)
        tracker.finish(status, fin)
