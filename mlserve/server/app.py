"""The starlette app factory: routes, lifespan (engine start/stop) and the error table."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mlserve.engine.base import RequestError
from mlserve.errors import EngineError, InvalidInputError, MlserveError, NotFoundError
from mlserve.server import auth, health, routes_openai
from mlserve.server.follow import Followers, FollowPlan
from mlserve.server.state import ServedModel, ServerSettings, ServerState

log = logging.getLogger("mlserve.server")


def error_response(status: int, message: str, kind: str, code: str | None, retry_after: int | None = None) -> Response:
    """An error in OpenAI's shape."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {"error": {"message": message, "type": kind, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def map_error(exc: Exception, retry_after: int = 1) -> Response:
    """The one table from exceptions to HTTP statuses."""
    if isinstance(exc, RequestError):
        ra = retry_after if exc.status == 503 else None
        return error_response(exc.status, exc.message, exc.kind, exc.code, ra)
    if isinstance(exc, NotFoundError):
        return error_response(404, exc.message, "invalid_request_error", "model_not_found")
    if isinstance(exc, InvalidInputError):
        return error_response(400, exc.message, "invalid_request_error", None)
    if isinstance(exc, EngineError):
        return error_response(503, exc.message, "server_error", "engine_unavailable", retry_after)
    if isinstance(exc, MlserveError):
        return error_response(400, exc.message, "invalid_request_error", None)
    if isinstance(exc, HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), kind, None)
    log.error("internal error: %s", type(exc).__name__)
    return error_response(500, "Internal server error.", "server_error", None)


def create_app(
    models: list[ServedModel], settings: ServerSettings | None = None, follow: FollowPlan | None = None
) -> Starlette:
    """Build the app; engines start in the background so health answers while they load.

    With ``follow``, models served as ``NAME@CHANNEL`` switch versions when their channel moves.
    """
    state = ServerState(models, settings or ServerSettings())
    followers = Followers(state, follow) if follow is not None else None
    guard = auth.build_guard(state.settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader = asyncio.create_task(_start_all(state))
        if followers is not None:
            followers.start()
        try:
            yield
        finally:
            loader.cancel()
            if followers is not None:
                await followers.close()
            for m in state.models:
                await m.engine.close()

    async def on_error(request: Request, exc: Exception) -> Response:
        return map_error(exc, state.settings.retry_after)

    routes = [
        *health.routes(),
        Route("/v1/models", routes_openai.list_models, methods=["GET"]),
        Route("/v1/chat/completions", routes_openai.chat_completions, methods=["POST"]),
        Route("/v1/completions", routes_openai.completions, methods=["POST"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={Exception: on_error, HTTPException: on_error, MlserveError: on_error},
        middleware=[Middleware(auth.AuthMiddleware, guard=guard)],
    )
    app.state.mlserve = state
    app.state.reload = followers.reload if followers is not None else None  # SIGHUP (run.py)
    app.state.guard = guard
    return app


async def _start_all(state: ServerState) -> None:
    for m in state.models:
        try:
            await m.engine.start()
            state.metrics.engine_up.labels(m.id).set(1)
            log.info("model %s ready", m.id)
        except MlserveError as exc:
            log.error("model %s failed to load: %s", m.id, exc.message)


async def metrics_route(request: Request) -> Response:
    """GET /metrics in Prometheus text format."""
    state: ServerState = request.app.state.mlserve
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
