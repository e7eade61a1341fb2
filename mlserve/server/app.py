"""The starlette app factory: surfaces from the registry, the context middleware, the lifespan.

No work at import time. The lifespan starts engines in the background (health answers while
they load), runs channel followers, and on the way out stops followers and engines and flushes
the audit writer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from mlserve.errors import MlserveError
from mlserve.server.auditing import AuditWriter
from mlserve.server.auth import build_guard
from mlserve.server.context import ContextMiddleware
from mlserve.server.follow import Followers, FollowPlan
from mlserve.server.registry import Registry
from mlserve.server.service import InferenceService
from mlserve.server.settings import ServerSettings
from mlserve.server.state import ServedModel, ServerState
from mlserve.server.surfaces import FALLBACK, surfaces_for

log = logging.getLogger("mlserve.server")


async def _reraise(request: Request, exc: Exception) -> Response:
    """Let the router's 404/405 reach the context middleware, the one place errors become responses."""
    raise exc


def create_app(
    models: list[ServedModel], settings: ServerSettings | None = None, follow: FollowPlan | None = None
) -> Starlette:
    """Build the app; with ``follow``, models served as ``NAME@CHANNEL`` switch versions when the channel moves."""
    settings = settings or ServerSettings()
    guard = build_guard(settings)
    state = ServerState(models, settings, guard)
    followers = Followers(state, follow) if follow is not None else None
    # --route-prefix mounts the OpenAI routes again (KServe's /openai/v1/...); the plain ones stay.
    mounts = [(settings.route_prefix, "openai")] if settings.route_prefix else []
    registry = Registry(surfaces_for(settings), FALLBACK, mounts)
    writer = AuditWriter(guard.audit) if guard.audit is not None else None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader = asyncio.create_task(_start_all(state))
        if followers is not None:
            followers.start()
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            if followers is not None:
                await followers.close()
            for m in list(state.models):
                await m.engine.close()
            if writer is not None:
                await asyncio.to_thread(writer.close)

    app = Starlette(
        routes=registry.routes(),
        lifespan=lifespan,
        exception_handlers={HTTPException: _reraise, MlserveError: _reraise},
        middleware=[Middleware(ContextMiddleware, state=state, registry=registry, writer=writer)],
    )
    app.state.mlserve = state
    app.state.service = InferenceService(state)
    app.state.registry = registry
    app.state.reload = followers.reload if followers is not None else None  # SIGHUP (run.py)
    return app


async def _start_all(state: ServerState) -> None:
    for m in state.models:
        try:
            await m.engine.start()
            state.metrics.engine_up.labels(m.id).set(1)
            log.info("model %s ready", m.id)
        except MlserveError as exc:
            log.error("model %s failed to load: %s", m.id, exc.message)
