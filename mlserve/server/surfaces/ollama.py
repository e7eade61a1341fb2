"""The Ollama surface: Ollama's REST API (/api/chat, /api/generate, /api/embed, /api/tags, ...) over the service.

It owns only Ollama's schemas, JSON and NDJSON shapes and its ``{"error": "..."}`` error shape;
lookup, admission, deadlines, disconnects and settlement belong to the inference service and the
context middleware. Pulling, pushing, creating, copying and deleting models are admin acts done
with the CLI on the server, so those routes answer a refusal that says so (never a bare 404).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from mlserve.engine.api import ErrorEvent, FinishEvent, InvalidRequest, Unavailable
from mlserve.errors import NotFoundError
from mlserve.server import sse
from mlserve.server.body import read_json, validate
from mlserve.server.context import RequestContext, context_of
from mlserve.server.errors import Forbidden, Outcome, outcome_of
from mlserve.server.registry import RouteSpec, Surface
from mlserve.server.service import Generation, Prompt, service_of
from mlserve.server.state import ServedModel, state_of
from mlserve.server.surfaces.ollama_schemas import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    Options,
    ShowRequest,
    _Generating,
)

# The Ollama API level mlserve speaks (structured `format`, /api/embed, `capabilities` in /api/show;
# not `think`, which came in 0.9). Clients such as Open WebUI and Continue refuse servers that report
# an older Ollama, and mlserve's own version number means nothing to them.
OLLAMA_API_LEVEL = "0.6.8"
NDJSON = "application/x-ndjson"
NEVER = "9999-12-31T23:59:59Z"  # /api/ps expires_at: a served model stays loaded until the server stops
NOT_FOUND = "model not found: it is not served here; GET /api/tags lists the models served."


def _name(request: Request, name: str) -> str:
    """Ollama's ``NAME:latest`` is the default version, mlserve's bare ``NAME`` (unless a version is called latest)."""
    if name.endswith(":latest") and state_of(request).routed(name) is None:
        return name.removesuffix(":latest")
    return name


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _stamp(epoch: int) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


# -- listing -------------------------------------------------------------------


def _human(count: Any) -> str:
    """A parameter count as Ollama prints it: 268M, 7.6B."""
    if not isinstance(count, int) or count <= 0:
        return ""
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    if count >= 1_000_000:
        return f"{count / 1e6:.0f}M"
    return f"{count / 1e3:.0f}K"


def details(m: ServedModel) -> dict[str, Any]:
    """Ollama's ``details``: format, family, parameter size and quantization level, from the bundle's GGUF facts."""
    arch = str(m.gguf.get("architecture") or "")
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch] if arch else None,
        "parameter_size": _human(m.gguf.get("parameter_count")),
        "quantization_level": str(m.gguf.get("file_type") or ""),
    }


def _entry(ident: str, m: ServedModel) -> dict[str, Any]:
    return {
        "name": ident,
        "model": ident,
        "modified_at": _stamp(m.created),
        "size": m.size,
        "digest": m.digest.removeprefix("sha256:"),
        "details": details(m),
    }


async def root(request: Request) -> Response:
    """GET /: Ollama clients probe it before anything else."""
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> Response:
    """GET /api/version: the Ollama API level served."""
    return JSONResponse({"version": OLLAMA_API_LEVEL})


async def tags(request: Request) -> Response:
    """GET /api/tags: every name a client may send (NAME and NAME:VERSION), with digest, size and details."""
    return JSONResponse({"models": [_entry(ident, m) for ident, m in state_of(request).public_ids()]})


async def ps(request: Request) -> Response:
    """GET /api/ps: the served models that are loaded and ready now."""
    models = [
        {**_entry(ident, m), "expires_at": NEVER, "context_length": m.ctx_size}
        for ident, m in state_of(request).public_ids()
        if m.engine.health().ready
    ]
    return JSONResponse({"models": models})


def _parameters(m: ServedModel) -> list[str]:
    """The model's serving defaults as Modelfile PARAMETER lines (Ollama's names)."""
    names = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p"}
    names |= {"repeat_penalty": "repeat_penalty", "max_tokens": "num_predict"}
    lines = [f"{ollama} {m.defaults[ours]}" for ours, ollama in names.items() if ours in m.defaults]
    if m.ctx_size is not None:
        lines.append(f"num_ctx {m.ctx_size}")
    return lines + [f"stop {json.dumps(s)}" for s in m.stop]


async def show(request: Request) -> Response:
    """POST /api/show: details, model_info, serving parameters and capabilities of one model."""
    body = await validate(ShowRequest, await read_json(request, state_of(request).settings.max_body_bytes))
    m = state_of(request).routed(_name(request, body.target()))
    if m is None:
        raise NotFoundError(NOT_FOUND)
    context_of(request).model = m
    g = m.gguf
    arch = str(g.get("architecture") or "")
    info: dict[str, Any] = {"general.architecture": arch, "general.parameter_count": g.get("parameter_count")}
    if g.get("model_name"):
        info["general.name"] = g["model_name"]
    if g.get("context_length"):
        info[f"{arch}.context_length"] = g["context_length"]
    params = _parameters(m)
    modelfile = f"# Served by mlserve: {m.id} ({m.digest})\nFROM {m.id}\n"
    modelfile += "".join(f"PARAMETER {line}\n" for line in params)
    return JSONResponse(
        {
            "license": "",
            "modelfile": modelfile,
            "parameters": "\n".join(params),
            "template": "",
            "details": details(m),
            "model_info": info,
            "capabilities": ["completion", "embedding"] if m.embeddings else ["completion"],
            "modified_at": _stamp(m.created),
        }
    )


# -- generation ----------------------------------------------------------------


@dataclass(frozen=True)
class _Clock:
    """When the request arrived, got its sequence and had its first token: Ollama's durations."""

    started: float
    admitted: float
    first: float

    def durations(self) -> dict[str, int]:
        now = time.monotonic()
        return {
            "total_duration": _ns(now - self.started),
            "load_duration": 0,  # served models are always loaded
            "prompt_eval_duration": _ns(self.first - self.admitted),
            "eval_duration": _ns(now - self.first),
        }


Shape = Callable[[str], dict[str, Any]]


def _chat_piece(text: str) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": text}}


def _generate_piece(text: str) -> dict[str, Any]:
    return {"response": text}


def _done(name: str, fin: FinishEvent, clock: _Clock, piece: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": name,
        "created_at": _now(),
        **piece,
        "done": True,
        "done_reason": fin.reason,
        **clock.durations(),
        "prompt_eval_count": fin.prompt_tokens,
        "eval_count": fin.completion_tokens,
    }


def _model(request: Request, ctx: RequestContext, asked: str) -> tuple[str, ServedModel]:
    """The name to send the service and the model it names now (404 when none)."""
    name = _name(request, asked)
    return name, service_of(request).lookup(ctx, name)


def _loaded(body: _Generating, model: ServedModel, piece: Shape) -> Response:
    """Nothing to generate: Ollama's way to load a model, which is loaded already (or loading: 503)."""
    if body.unloading():
        raise InvalidRequest("Unloading a model (keep_alive 0) is not supported: models stay loaded while served.")
    health = model.engine.health()
    if not health.ready:
        raise Unavailable(f"Model {model.id} is not ready ({health.state}).")
    return JSONResponse({"model": body.model, "created_at": _now(), **piece(""), "done": True, "done_reason": "load"})


async def chat(request: Request) -> Response:
    """POST /api/chat (streams NDJSON unless ``stream`` is false)."""
    ctx = context_of(request)
    body = await validate(ChatRequest, await read_json(request, state_of(request).settings.max_body_bytes))
    name, model = _model(request, ctx, body.model)
    params = body.params(model.ctx_size)
    messages = body.template_messages()
    if not messages:
        return _loaded(body, model, _chat_piece)
    gen = await service_of(request).start(request, ctx, name, Prompt(messages=messages), params)
    return await _answer(ctx, gen, body, _chat_piece)


async def generate(request: Request) -> Response:
    """POST /api/generate: the prompt through the chat template, as Ollama does, or as it is with ``raw``."""
    ctx = context_of(request)
    body = await validate(GenerateRequest, await read_json(request, state_of(request).settings.max_body_bytes))
    name, model = _model(request, ctx, body.model)
    params = body.params(model.ctx_size)
    if not body.prompt:
        return _loaded(body, model, _generate_piece)
    prompt = Prompt(text=body.prompt) if body.raw else Prompt(messages=body.template_messages())
    gen = await service_of(request).start(request, ctx, name, prompt, params)
    return await _answer(ctx, gen, body, _generate_piece)


async def _answer(ctx: RequestContext, gen: Generation, body: _Generating, piece: Shape) -> Response:
    admitted = gen.req.admitted_at or ctx.started
    clock = _Clock(ctx.started, admitted, time.monotonic())
    if body.stream:
        return sse.EventStream(_lines(ctx, gen, body.model, clock, piece), gen.aclose, media_type=NDJSON)
    text, fin = await gen.collect()
    return JSONResponse(_done(body.model, fin, clock, piece(text)))


async def _lines(ctx: RequestContext, gen: Generation, name: str, clock: _Clock, piece: Shape) -> AsyncIterator[bytes]:
    """NDJSON in Ollama's shape; an error mid-way is one ``{"error": ...}`` line before the stream ends."""
    try:
        async for ev in gen:
            if isinstance(ev, ErrorEvent):
                raise ev.error
            if ev.text:
                yield sse.ndjson({"model": name, "created_at": _now(), **piece(ev.text), "done": False})
            if isinstance(ev, FinishEvent):
                yield sse.ndjson(_done(name, ev, clock, piece("")))
    except Exception as exc:  # noqa: BLE001 - the client must hear why its stream ended
        ctx.outcome = outcome = outcome_of(exc)
        yield sse.ndjson({"error": outcome.message})


# -- embeddings ----------------------------------------------------------------


async def embed(request: Request) -> Response:
    """POST /api/embed: one L2-normalised vector per input, decoded together."""
    ctx = context_of(request)
    body = await validate(EmbedRequest, await read_json(request, state_of(request).settings.max_body_bytes))
    name, model = _model(request, ctx, body.model)
    (body.options or Options()).check_context(model.ctx_size)
    result = await service_of(request).embed(request, ctx, name, body.inputs(), dimensions=body.dimensions)
    return JSONResponse(
        {
            "model": body.model,
            "embeddings": result.vectors,
            "total_duration": _ns(time.monotonic() - ctx.started),
            "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens,
        }
    )


async def embeddings(request: Request) -> Response:
    """POST /api/embeddings: Ollama's older one-text form of /api/embed."""
    ctx = context_of(request)
    body = await validate(EmbeddingsRequest, await read_json(request, state_of(request).settings.max_body_bytes))
    name, model = _model(request, ctx, body.model)
    (body.options or Options()).check_context(model.ctx_size)
    result = await service_of(request).embed(request, ctx, name, [body.prompt])
    return JSONResponse({"embedding": result.vectors[0]})


# -- admin acts, refused -------------------------------------------------------

_REFUSALS = {
    "/api/pull": "Pulling models is an admin act: run `mlserve pull SOURCE` on the server, then serve the bundle.",
    "/api/push": "Pushing models is an admin act: move bundles with `mlserve export` and `mlserve import`.",
    "/api/create": "Creating models is an admin act: run `mlserve pack FILE.gguf --name NAME` on the server.",
    "/api/copy": "Copying models is an admin act: versions are immutable; move channels with `mlserve promote`.",
    "/api/delete": "Deleting models is an admin act: run `mlserve rm REF` on the server.",
    "/api/blobs": "Uploading blobs is an admin act: run `mlserve pack FILE.gguf --name NAME` on the server.",
}


async def refuse(request: Request) -> Response:
    """Model management through the API: refused with 403 naming the CLI command that does it."""
    path = request.url.path
    raise Forbidden(next(msg for prefix, msg in _REFUSALS.items() if path.startswith(prefix)))


def render_error(outcome: Outcome) -> Response:
    """Ollama's error shape, ``{"error": "..."}``."""
    message = NOT_FOUND if outcome.code == "model_not_found" else outcome.message
    return JSONResponse({"error": message}, status_code=outcome.status)


SURFACE = Surface(
    "ollama",
    (
        RouteSpec("/", root, ("GET",), "open"),
        RouteSpec("/api/version", version, ("GET",), "open"),
        RouteSpec("/api/tags", tags, ("GET",), "infer"),
        RouteSpec("/api/ps", ps, ("GET",), "infer"),
        RouteSpec("/api/show", show, ("POST",), "infer", body=ShowRequest),
        RouteSpec("/api/chat", chat, ("POST",), "infer", audited=True, body=ChatRequest, streams=NDJSON),
        RouteSpec("/api/generate", generate, ("POST",), "infer", audited=True, body=GenerateRequest, streams=NDJSON),
        RouteSpec("/api/embed", embed, ("POST",), "infer", audited=True, body=EmbedRequest),
        RouteSpec("/api/embeddings", embeddings, ("POST",), "infer", audited=True, body=EmbeddingsRequest),
        RouteSpec("/api/pull", refuse, ("POST",), "admin"),
        RouteSpec("/api/push", refuse, ("POST",), "admin"),
        RouteSpec("/api/create", refuse, ("POST",), "admin"),
        RouteSpec("/api/copy", refuse, ("POST",), "admin"),
        RouteSpec("/api/delete", refuse, ("DELETE",), "admin"),
        RouteSpec("/api/blobs/{digest}", refuse, ("HEAD", "POST"), "admin"),
    ),
    render_error,
)
