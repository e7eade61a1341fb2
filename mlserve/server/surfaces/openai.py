"""The OpenAI surface: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings in OpenAI's wire format.

It owns only its schemas, JSON and SSE shapes and error shape; lookup, admission, deadlines,
disconnects and settlement belong to the inference service and the context middleware.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlserve.engine.api import ErrorEvent, FinishEvent
from mlserve.server import sse
from mlserve.server.body import read_json, validate
from mlserve.server.context import RequestContext, context_of
from mlserve.server.errors import outcome_of, render_openai
from mlserve.server.registry import RouteSpec, Surface
from mlserve.server.service import Generation, Params, Prompt, service_of
from mlserve.server.state import state_of
from mlserve.server.surfaces.common import speculates
from mlserve.server.surfaces.openai_schemas import ChatRequest, CompletionRequest, EmbeddingRequest, _Sampling


async def list_models(request: Request) -> Response:
    """GET /v1/models: NAME and NAME:VERSION for each served model."""
    state = state_of(request)
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


def _params(body: _Sampling, max_tokens: int | None) -> Params:
    return Params(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        seed=body.seed,
        stop=tuple(body.stop or ()),
        deterministic=bool(body.mlserve and body.mlserve.deterministic),
        speculate=speculates(body.mlserve),
        json_schema=body.response_format.output_schema() if body.response_format is not None else None,
    )


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions."""
    ctx = context_of(request)
    body = await validate(ChatRequest, await read_json(request, state_of(request).settings.max_body_bytes))
    prompt = Prompt(messages=body.template_messages())
    params = _params(body, body.max_completion_tokens or body.max_tokens)
    gen = await service_of(request).start(request, ctx, body.model, prompt, params)
    return await _answer(ctx, gen, "chat", body)


async def completions(request: Request) -> Response:
    """POST /v1/completions."""
    ctx = context_of(request)
    body = await validate(CompletionRequest, await read_json(request, state_of(request).settings.max_body_bytes))
    given = body.prompt_text()
    prompt = Prompt(token_ids=given) if isinstance(given, list) else Prompt(text=given)
    gen = await service_of(request).start(request, ctx, body.model, prompt, _params(body, body.max_tokens))
    return await _answer(ctx, gen, "completion", body)


async def embeddings(request: Request) -> Response:
    """POST /v1/embeddings: mean-pooled, L2-normalised vectors, the inputs decoded together."""
    ctx = context_of(request)
    body = await validate(EmbeddingRequest, await read_json(request, state_of(request).settings.max_body_bytes))
    result = await service_of(request).embed(request, ctx, body.model, body.texts(), body.dimensions)
    encode = _base64 if body.encoding_format == "base64" else list
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)]
    tokens = result.prompt_tokens
    model = ctx.model.id if ctx.model is not None else body.model
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage})


def _base64(vector: list[float]) -> str:
    """Little-endian float32 bytes in base64, as the openai client decodes them."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def _answer(ctx: RequestContext, gen: Generation, kind: str, body: _Sampling) -> Response:
    ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + ctx.id
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.EventStream(_chunks(ctx, gen, kind, ident, include_usage), gen.aclose)
    text, fin = await gen.collect()
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": fin.reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": fin.reason, "logprobs": None}
    return JSONResponse(
        {
            "id": ident,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": gen.model.id,
            "choices": [choice],
            "usage": _usage(fin),
        }
    )


def _usage(fin: FinishEvent) -> dict[str, int]:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }


async def _chunks(
    ctx: RequestContext, gen: Generation, kind: str, ident: str, include_usage: bool
) -> AsyncIterator[bytes]:
    """SSE chunks in OpenAI's shape; an error mid-way is sent as an error event before the stream ends."""
    base = {
        "id": ident,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": gen.model.id,
    }

    def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return sse.event({**base, "choices": [choice]})

    if kind == "chat":
        yield chunk(None, None, role=True)
    try:
        async for ev in gen:
            if isinstance(ev, ErrorEvent):
                raise ev.error
            if ev.text:
                yield chunk(ev.text, None)
            if isinstance(ev, FinishEvent):
                yield chunk(None, ev.reason)
                if include_usage:
                    yield sse.event({**base, "choices": [], "usage": _usage(ev)})
    except Exception as exc:  # noqa: BLE001 - the client must hear why its stream ended
        ctx.outcome = outcome = outcome_of(exc)
        yield sse.event({"error": {"message": outcome.message, "type": outcome.kind, "code": outcome.code}})
    yield sse.DONE


SURFACE = Surface(
    "openai",
    (
        RouteSpec("/v1/models", list_models, ("GET",), "infer"),
        RouteSpec(
            "/v1/chat/completions",
            chat_completions,
            ("POST",),
            "infer",
            audited=True,
            body=ChatRequest,
            streams="text/event-stream",
        ),
        RouteSpec(
            "/v1/completions",
            completions,
            ("POST",),
            "infer",
            audited=True,
            body=CompletionRequest,
            streams="text/event-stream",
        ),
        RouteSpec("/v1/embeddings", embeddings, ("POST",), "infer", audited=True, body=EmbeddingRequest),
    ),
    render_openai,
)
