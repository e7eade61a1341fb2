"""Liveness and readiness, answered from the event loop without touching an engine thread."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mlserve.server.state import ServerState


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.mlserve
    return state


async def live(request: Request) -> JSONResponse:
    """GET /health/live."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    """GET /health/ready: 200 when every model is loaded and warmed, else 503."""
    state = _state(request)
    models = {m.id: m.engine.health().state for m in state.models}
    if state.draining:
        status = "draining"
    elif all(s == "ready" for s in models.values()):
        status = "ready"
    elif any(s == "failed" for s in models.values()):
        status = "failed"
    else:
        status = "loading"
    code = 200 if status == "ready" else 503
    headers = None if code == 200 else {"Retry-After": str(state.settings.retry_after)}
    return JSONResponse({"status": status, "models": models}, status_code=code, headers=headers)


async def v2_live(request: Request) -> JSONResponse:
    """GET /v2/health/live (KServe Open Inference Protocol)."""
    return JSONResponse({"live": True})


async def v2_ready(request: Request) -> JSONResponse:
    """GET /v2/health/ready (KServe Open Inference Protocol)."""
    ok = _state(request).ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


async def v2_model_ready(request: Request) -> JSONResponse:
    """GET /v2/models/{name}/ready."""
    state = _state(request)
    model = state.lookup(request.path_params["name"])
    ok = model.engine.health().ready and not state.draining
    return JSONResponse({"name": model.id, "ready": ok}, status_code=200 if ok else 503)


def routes() -> list[Route]:
    """The health routes."""
    return [
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/v2/health/live", v2_live, methods=["GET"]),
        Route("/v2/health/ready", v2_ready, methods=["GET"]),
        Route("/v2/models/{name:path}/ready", v2_model_ready, methods=["GET"]),
    ]
