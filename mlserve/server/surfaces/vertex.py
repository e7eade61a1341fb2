"""The Vertex AI custom-container surface: ``AIP_PREDICT_ROUTE`` and ``AIP_HEALTH_ROUTE``.

Vertex AI sends ``{"instances": [...], "parameters": {...}}`` to the predict route and expects
``{"predictions": [...]}``, one prediction per instance, in order. Each instance is a chat
request (``{"messages": [...]}``) or a prompt (``{"prompt": "..."}``); ``parameters`` holds the
sampling options shared by every instance and, when the server serves several models, ``model``.
All instances are started together, so the engine decodes them in the same batches; the request
is one request to the context middleware (one audit record, usage summed over the instances).
Errors use Google's shape, ``{"error": {"code", "message", "status"}}``.

The routes come from the environment Vertex sets (``serve`` reads it into ``ServerSettings``),
so this module builds its ``Surface`` from settings instead of exposing a fixed one.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlserve.engine.api import FinishEvent, InvalidRequest, RequestError
from mlserve.errors import MlserveError, UsageError
from mlserve.names import canonical_text
from mlserve.server import health
from mlserve.server.auditing import prompt_sha256
from mlserve.server.body import read_json, validate
from mlserve.server.context import RequestContext, context_of
from mlserve.server.errors import Outcome
from mlserve.server.registry import RouteSpec, Surface
from mlserve.server.service import InferenceService, Params, Prompt
from mlserve.server.settings import ServerSettings
from mlserve.server.state import ServedModel, ServerState
from mlserve.server.surfaces.common import MlserveOptions, StopStrings, speculates

MAX_INSTANCES = 32  # within the engine's default queue (64), so one request cannot overload it alone
_ROUTE = re.compile(r"/[^\s{}?#]*")  # a literal path: braces would turn into starlette path parameters
# Google's canonical codes for the HTTP statuses this server answers with.
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class _Body(BaseModel):
    # Unknown fields are refused: an option we silently ignored would be a lie.
    model_config = ConfigDict(extra="forbid")


class VertexMessage(_Body):
    """One chat message of an instance."""

    role: Literal["system", "user", "assistant"]
    content: str


class VertexInstance(_Body):
    """One instance: chat messages or a text prompt (exactly one of them)."""

    messages: list[VertexMessage] | None = Field(None, min_length=1)
    prompt: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> VertexInstance:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("each instance needs exactly one of 'messages' and 'prompt'")
        return self

    def as_prompt(self) -> Prompt:
        """The service's prompt for this instance."""
        if self.messages is not None:
            return Prompt(messages=[m.model_dump() for m in self.messages])
        return Prompt(text=self.prompt)


class VertexParameters(_Body):
    """Sampling options shared by every instance; ``model`` picks one of several served models."""

    model: str | None = Field(None, min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)
    stop: StopStrings | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    def as_params(self, deterministic: bool) -> Params:
        """The service's sampling parameters."""
        return Params(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            deterministic=deterministic,
        )


class PredictRequest(_Body):
    """A Vertex AI prediction request."""

    instances: list[VertexInstance] = Field(min_length=1, max_length=MAX_INSTANCES)
    parameters: VertexParameters = Field(default_factory=VertexParameters)
    mlserve: MlserveOptions | None = None  # mlserve's own options, e.g. {"deterministic": true}


@dataclass
class _Answer:
    """What one instance produced."""

    text: str
    finish: FinishEvent


def render_vertex(outcome: Outcome) -> Response:
    """Google's error shape: ``{"error": {"code", "message", "status"}}``."""
    status = _STATUS.get(outcome.status, "INTERNAL" if outcome.status >= 500 else "FAILED_PRECONDITION")
    body = {"error": {"code": outcome.status, "message": outcome.message, "status": status}}
    return JSONResponse(body, status_code=outcome.status)


def _model_name(state: ServerState, params: VertexParameters) -> str:
    """``parameters.model``, else the one model served; several models and no choice is ambiguous (400)."""
    if params.model is not None:
        return params.model
    names = sorted({m.name for m in state.models})
    if len(names) != 1:
        raise InvalidRequest(
            f"This server serves {len(names)} models; set parameters.model to one of them (GET /v1/models)."
        )
    return names[0]


async def predict(request: Request) -> Response:
    """POST AIP_PREDICT_ROUTE: one prediction per instance, all instances batched together."""
    ctx = context_of(request)
    state: ServerState = request.app.state.mlserve
    service: InferenceService = request.app.state.service
    body = await validate(PredictRequest, await read_json(request, state.settings.max_body_bytes))
    prompts = [instance.as_prompt() for instance in body.instances]
    params = replace(
        body.parameters.as_params(bool(body.mlserve and body.mlserve.deterministic)), speculate=speculates(body.mlserve)
    )
    # One version for the whole request: a lookup per instance could split it across a canary or a
    # channel switch, and only the version admitted here is kept alive until the request ends.
    model = service.lookup(ctx, _model_name(state, body.parameters))
    ctx.admit(model, state)
    ctx.prompt_sha256 = await asyncio.to_thread(prompt_sha256, [p.as_received() for p in prompts])
    subs = [_sub_context(ctx) for _ in prompts]
    answers = await _run_all(request, _Pinned(state, model), subs, prompts, params)
    _settle_usage(ctx, subs, [a.text for a in answers])
    predictions = [
        {
            "content": a.text,
            "finish_reason": a.finish.reason,
            "prompt_tokens": a.finish.prompt_tokens,
            "completion_tokens": a.finish.completion_tokens,
        }
        for a in answers
    ]
    return JSONResponse({"predictions": predictions})


def _sub_context(ctx: RequestContext) -> RequestContext:
    """A context for one instance's generation: already admitted (the request is counted once)."""
    return RequestContext(ctx.id, ctx.path, ctx.client, ctx.route, started=ctx.started, key=ctx.key, admitted=True)


class _Pinned(InferenceService):
    """The inference service with the model already chosen: every instance runs on that version."""

    def __init__(self, state: ServerState, model: ServedModel) -> None:
        super().__init__(state)
        self.model = model

    def lookup(self, ctx: RequestContext, name: str) -> ServedModel:
        """The pinned model, whatever the name (the request looked it up once)."""
        ctx.model = self.model
        return self.model


async def _run_all(
    request: Request, service: _Pinned, subs: list[RequestContext], prompts: list[Prompt], params: Params
) -> list[_Answer]:
    """Start every instance at once and collect each; the first failure stops the others."""

    async def one(sub: RequestContext, prompt: Prompt) -> _Answer:
        gen = await service.start(request, sub, service.model.id, prompt, params)
        text, finish = await gen.collect()
        return _Answer(text, finish)

    tasks = [asyncio.ensure_future(one(sub, prompt)) for sub, prompt in zip(subs, prompts, strict=True)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:  # on a failure, or when this request is cancelled: abort every other instance
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for index, task in enumerate(tasks):
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise _for_instance(error, index, len(tasks))
    return [task.result() for task in tasks]


def _for_instance(exc: BaseException, index: int, total: int) -> BaseException:
    """The error with the failing instance named (the same class, so it maps to the same status)."""
    if total > 1 and isinstance(exc, RequestError) and type(exc).__init__ is MlserveError.__init__:
        return type(exc)(f"instances[{index}]: {exc.message}", exc.hint)
    return exc


def _settle_usage(ctx: RequestContext, subs: list[RequestContext], texts: list[str]) -> None:
    """Sum the instances' usage into the request's context (what the audit record and metrics read)."""
    ctx.sampling = subs[0].sampling
    ctx.deterministic = subs[0].deterministic
    # Like prompt_sha256 of the instances: the sha256 of the canonical JSON list of the predictions' texts.
    ctx.output_hash = hashlib.sha256(canonical_text(texts).encode("utf-8", "surrogatepass"))
    ctx.prompt_tokens = sum(s.prompt_tokens or 0 for s in subs)
    ctx.completion_tokens = sum(s.completion_tokens or 0 for s in subs)
    ctx.generating = True
    ctx.finished = all(s.finished for s in subs)
    if all(s.completion is not None for s in subs):
        ctx.completion = ["\n".join("".join(s.completion or ()) for s in subs)]


def surfaces(settings: ServerSettings, others: Sequence[Surface] = ()) -> tuple[Surface, ...]:
    """The Vertex AI surface when settings name its routes (``AIP_PREDICT_ROUTE``/``AIP_HEALTH_ROUTE``).

    A health route that is already an open GET route of ``others`` (a model uploaded with
    ``--container-health-route=/health/ready``) is left to that route.
    """
    routes: list[RouteSpec] = []
    probes = {
        spec.path for surface in others for spec in surface.routes if spec.scope == "open" and "GET" in spec.methods
    }
    if settings.vertex_health_route and settings.vertex_health_route not in probes:
        routes.append(
            RouteSpec(
                settings.vertex_health_route,
                health.ready,
                ("GET",),
                "open",
                summary="Vertex AI health check (AIP_HEALTH_ROUTE): 200 when every model is ready.",
            )
        )
    if settings.vertex_predict_route:
        routes.append(
            RouteSpec(
                settings.vertex_predict_route,
                predict,
                ("POST",),
                "infer",
                audited=True,
                body=PredictRequest,
                summary="Vertex AI prediction (AIP_PREDICT_ROUTE): instances in, one prediction each out.",
            )
        )
    return (Surface("vertex", tuple(routes), render_vertex),) if routes else ()


@dataclass(frozen=True)
class VertexEnv:
    """What Vertex AI's environment asks of a custom container."""

    port: int | None = None
    predict_route: str | None = None
    health_route: str | None = None


def vertex_env(environ: Mapping[str, str]) -> VertexEnv:
    """``AIP_HTTP_PORT``, ``AIP_PREDICT_ROUTE`` and ``AIP_HEALTH_ROUTE`` (unset or empty: None); UsageError if bad."""
    port_text = environ.get("AIP_HTTP_PORT") or None
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise UsageError(f"AIP_HTTP_PORT is {port_text!r}, not a port number.", "Set it to e.g. 8080.")
        port = int(port_text)
    routes = []
    for name in ("AIP_PREDICT_ROUTE", "AIP_HEALTH_ROUTE"):
        route = environ.get(name) or None
        if route is not None and not _ROUTE.fullmatch(route):
            raise UsageError(f"{name} is {route!r}, not a path.", "Vertex AI sets it to a path starting with '/'.")
        routes.append(route)
    return VertexEnv(port, routes[0], routes[1])
