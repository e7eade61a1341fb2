"""One request context, settled once: the middleware that owns every request's bookkeeping.

The middleware creates a ``RequestContext`` (id, key, client, route, start, model, usage,
status), asks auth to fill in the key, runs the route, turns any exception into the route
surface's error response through the one error table, and in ``finally`` settles the request:
in-flight counts, metrics, the log line and the audit record, whatever happened (success,
4xx, 5xx, client gone, cancelled at shutdown). Routes and the inference service only fill
fields in and raise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlserve.engine.api import Sampling
from mlserve.server import auth
from mlserve.server.auditing import AuditWriter, sampling_record
from mlserve.server.errors import Outcome, outcome_of
from mlserve.server.registry import Matched, Registry

if TYPE_CHECKING:
    from mlserve.server.state import ServedModel, ServerState

log = logging.getLogger("mlserve.server")
content_log = logging.getLogger("mlserve.content")
_RID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
SCOPE_KEY = "mlserve.ctx"


def request_id(headers: Headers) -> str:
    """The client's ``x-request-id`` when it is a plain token, else a fresh one."""
    given = headers.get("x-request-id", "")
    return given if _RID.fullmatch(given) else "req-" + uuid.uuid4().hex


@dataclass
class RequestContext:
    """Everything known about one request; settled exactly once by ``ContextMiddleware``."""

    id: str
    path: str
    client: str | None
    route: Matched | None
    started: float = field(default_factory=time.monotonic)
    key: str | None = None
    model: ServedModel | None = None
    admitted: bool = False  # counted in flight (a drain or a version switch waits for it)
    sampling: Sampling | None = None
    prompt_sha256: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    generating: bool = False  # a generation started: ending without ``finished`` means it was cut
    finished: bool = False
    outcome: Outcome | None = None  # an error decided after the response began (mid-stream)
    completion: list[str] | None = None  # text, kept only under ``serve --log-content``
    deterministic: bool = False  # the client asked to be decoded alone (replayable)
    output_hash: Any = None  # hashlib.sha256 of the text sent so far, from the first event on
    http_status: int | None = None

    @property
    def audited(self) -> bool:
        """Whether this request gets an audit record, a log line and a request metric."""
        return self.route is not None and self.route.spec.audited

    def admit(self, model: ServedModel, state: ServerState) -> None:
        """Count the request in flight on ``model`` (undone by settling)."""
        self.model = model
        if not self.admitted:
            self.admitted = True
            model.in_flight += 1
            state.in_flight += 1
            state.metrics.in_flight.labels(model.id).inc()


def record_of(ctx: RequestContext, status: int, latency: float) -> dict[str, Any]:
    """The audit record of a settled request."""
    m = ctx.model
    return {
        "event": "inference",
        "request_id": ctx.id,
        "key": ctx.key,
        "client": ctx.client,
        "route": ctx.path,
        "model": m.name if m else None,
        "version": m.version if m else None,
        "digest": m.digest if m else None,
        "sampling": sampling_record(ctx.sampling),
        "prompt_tokens": ctx.prompt_tokens,
        "completion_tokens": ctx.completion_tokens,
        "latency_s": round(latency, 6),
        "status": status,
        "prompt_sha256": ctx.prompt_sha256,
        "deterministic": ctx.deterministic,
        # A schema grammar shaped the output: the schema is client text, so only the fact is kept.
        "constrained": getattr(ctx.sampling, "grammar", None) is not None,
        # Of the text the client was sent (all of it when status is 200); null when no generation began.
        "output_sha256": ctx.output_hash.hexdigest() if ctx.output_hash is not None else None,
    }


def context_of(request: Request) -> RequestContext:
    """The context the middleware made for this request."""
    ctx: RequestContext = request.scope[SCOPE_KEY]
    return ctx


class ContextMiddleware:
    """Creates, authenticates, maps errors for, and settles every HTTP request."""

    def __init__(self, app: ASGIApp, state: ServerState, registry: Registry, writer: AuditWriter | None) -> None:
        self.app = app
        self.state = state
        self.registry = registry
        self.writer = writer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        client = scope.get("client")
        ctx = RequestContext(request_id(headers), scope.get("path", ""), client[0] if client else None, None)
        scope[SCOPE_KEY] = ctx

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                ctx.http_status = int(message["status"])
                out = MutableHeaders(scope=message)
                out["x-request-id"] = ctx.id
                if ctx.model is not None:
                    out["x-mlserve-model"] = ctx.model.id
            await send(message)

        try:
            ctx.route = self.registry.match(scope)
            spec = ctx.route.spec if ctx.route else None
            record = auth.identify(self.state.guard, spec, headers)
            ctx.key = record.name if record else None
            auth.authorize(self.state.guard, spec, record)
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:  # noqa: BLE001 - the one place errors become responses
            outcome = outcome_of(exc, self.state.settings.retry_after)
            if ctx.http_status is None:
                await self.render(ctx, outcome)(scope, receive, send_with_headers)
            else:
                ctx.outcome = outcome  # the answer had begun: only the record can say so
        except asyncio.CancelledError:
            if ctx.outcome is None:  # cut at shutdown (drain timeout) or by a vanished client
                status = 503 if self.state.draining else 499
                ctx.outcome = Outcome(status, "server_error", None, "The request was cancelled.")
            raise
        finally:
            self.settle(ctx)

    def render(self, ctx: RequestContext, outcome: Outcome) -> ASGIApp:
        """The error response in the shape of the route's surface (OpenAI's for undeclared paths)."""
        surface = ctx.route.surface if ctx.route else self.registry.fallback
        response = surface.render_error(outcome)
        if outcome.retry_after is not None:
            response.headers["Retry-After"] = str(outcome.retry_after)
        if outcome.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    def settle(self, ctx: RequestContext) -> None:
        """Undo in-flight counts; for audited routes count, log and audit (never any request text)."""
        state = self.state
        model = ctx.model
        if ctx.admitted and model is not None:
            ctx.admitted = False
            model.in_flight -= 1
            state.in_flight -= 1
            state.metrics.in_flight.labels(model.id).dec()
        if not ctx.audited:
            return
        status = self.status_of(ctx)
        elapsed = time.monotonic() - ctx.started
        mid = model.id if model is not None else ""
        m = state.metrics
        m.requests.labels(mid, ctx.path, str(status)).inc()
        if model is not None:
            m.duration.labels(mid).observe(elapsed)
            if ctx.finished:
                m.prompt_tokens.labels(mid).inc(ctx.prompt_tokens or 0)
                m.generation_tokens.labels(mid).inc(ctx.completion_tokens or 0)
        log.info(
            "request %s %s model=%s status=%d prompt_tokens=%s completion_tokens=%s seconds=%.3f",
            ctx.id,
            ctx.path,
            mid or "-",
            status,
            ctx.prompt_tokens if ctx.prompt_tokens is not None else "-",
            ctx.completion_tokens if ctx.completion_tokens is not None else "-",
            elapsed,
        )
        if ctx.completion is not None and ctx.finished:
            content_log.info(
                "request %s completion=%s", ctx.id, json.dumps("".join(ctx.completion), ensure_ascii=False)
            )
        if self.writer is not None:
            self.writer.submit(record_of(ctx, status, elapsed))

    @staticmethod
    def status_of(ctx: RequestContext) -> int:
        """The request's final status: a mid-stream outcome, a cut generation (499), else what was sent."""
        if ctx.outcome is not None:
            return ctx.outcome.status
        if ctx.generating and not ctx.finished:
            return 499
        return ctx.http_status if ctx.http_status is not None else 500
