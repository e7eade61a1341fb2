"""The Anthropic surface: the Messages API (/v1/messages, /v1/messages/count_tokens) over the inference service.

It owns only Anthropic's schemas, JSON and named-event SSE shapes and its error shape
(``{"type": "error", "error": {"type", "message"}}``); lookup, admission, deadlines, disconnects
and settlement belong to the inference service and the context middleware. ``x-api-key`` is read
by auth like ``Authorization: Bearer``; ``anthropic-version`` is accepted whatever it says, since
mlserve serves one version of this API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlserve.engine.api import ErrorEvent, FinishEvent
from mlserve.server import sse
from mlserve.server.body import read_json, validate
from mlserve.server.context import RequestContext, context_of
from mlserve.server.errors import Outcome, outcome_of
from mlserve.server.registry import RouteSpec, Surface
from mlserve.server.service import Generation, Params, Prompt, service_of
from mlserve.server.state import state_of
from mlserve.server.surfaces.anthropic_schemas import CountTokensRequest, MessagesRequest
from mlserve.server.surfaces.common import speculates

SSE = "text/event-stream"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
}


async def messages(request: Request) -> Response:
    """POST /v1/messages (Server-Sent Events with Anthropic's named events when ``stream`` is true)."""
    ctx = context_of(request)
    body = await validate(MessagesRequest, await read_json(request, state_of(request).settings.max_body_bytes))
    prompt = Prompt(messages=body.template_messages())
    params = Params(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        stop=tuple(body.stop_sequences or ()),
        json_schema=body.json_schema(),
        deterministic=bool(body.mlserve and body.mlserve.deterministic),
        speculate=speculates(body.mlserve),
    )
    gen = await service_of(request).start(request, ctx, body.model, prompt, params)
    asked = tuple(body.stop_sequences or ())
    ident = "msg_" + ctx.id
    if body.stream:
        response: Response = sse.EventStream(_events(ctx, gen, ident, asked), gen.aclose, media_type=SSE)
    else:
        text, fin = await gen.collect()
        reason, sequence = _stop(fin, asked)
        response = JSONResponse(
            {
                **_message(ident, gen, reason, sequence, fin.prompt_tokens, fin.completion_tokens),
                "content": [{"type": "text", "text": text}],
            }
        )
    response.headers["request-id"] = ctx.id  # where Anthropic's SDK looks for the request id
    return response


def _message(
    ident: str, gen: Generation, reason: str | None, sequence: str | None, input_tokens: int, output_tokens: int
) -> dict[str, Any]:
    return {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": gen.model.id,
        "content": [],
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


def _stop(fin: FinishEvent, asked: tuple[str, ...]) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for how the generation ended."""
    if fin.reason == "length":
        return "max_tokens", None
    # FinishEvent.stop names the stop string that ended the generation (None for an end-of-turn
    # token); a model's own stop strings (its chat template's turn end) are an end_turn too.
    hit = fin.stop
    if isinstance(hit, str) and hit in asked:
        return "stop_sequence", hit
    return "end_turn", None


async def _events(ctx: RequestContext, gen: Generation, ident: str, asked: tuple[str, ...]) -> AsyncIterator[bytes]:
    """Anthropic's event sequence; an error mid-way is an ``error`` event before the stream ends."""
    start = _message(ident, gen, None, None, len(gen.req.prompt_tokens), 0)
    yield sse.named("message_start", {"type": "message_start", "message": start})
    block = {"type": "text", "text": ""}
    yield sse.named("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
    yield sse.named("ping", {"type": "ping"})
    try:
        async for ev in gen:
            if isinstance(ev, ErrorEvent):
                raise ev.error
            if ev.text:
                delta = {"type": "text_delta", "text": ev.text}
                yield sse.named("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            if isinstance(ev, FinishEvent):
                reason, sequence = _stop(ev, asked)
                yield sse.named("content_block_stop", {"type": "content_block_stop", "index": 0})
                yield sse.named(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": sequence},
                        "usage": {"output_tokens": ev.completion_tokens},
                    },
                )
                yield sse.named("message_stop", {"type": "message_stop"})
    except Exception as exc:  # noqa: BLE001 - the client must hear why its stream ended
        ctx.outcome = outcome = outcome_of(exc)
        yield sse.named("error", _error_body(outcome))


async def count_tokens(request: Request) -> Response:
    """POST /v1/messages/count_tokens: the prompt's tokens under the model's chat template."""
    ctx = context_of(request)
    state = state_of(request)
    body = await validate(CountTokensRequest, await read_json(request, state.settings.max_body_bytes))
    tokens = await service_of(request).count_tokens(ctx, body.model, body.template_messages())
    response = JSONResponse({"input_tokens": tokens})
    response.headers["request-id"] = ctx.id
    return response


def _error_body(outcome: Outcome) -> dict[str, Any]:
    if outcome.code == "overloaded":
        kind = "overloaded_error"
    else:
        kind = _ERROR_TYPES.get(outcome.status, "api_error" if outcome.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": outcome.message}}


def render_error(outcome: Outcome) -> Response:
    """Anthropic's error shape, ``{"type": "error", "error": {"type", "message"}}``."""
    return JSONResponse(_error_body(outcome), status_code=outcome.status)


SURFACE = Surface(
    "anthropic",
    (
        RouteSpec("/v1/messages", messages, ("POST",), "infer", audited=True, body=MessagesRequest, streams=SSE),
        RouteSpec("/v1/messages/count_tokens", count_tokens, ("POST",), "infer", audited=True, body=CountTokensRequest),
    ),
    render_error,
)
