"""Probes and metrics: liveness, readiness, KServe's Open Inference Protocol health, Prometheus.

Every answer comes from plain attributes on the event loop, never from an engine thread.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlserve.server.errors import Outcome, render_openai
from mlserve.server.registry import RouteSpec, Surface
from mlserve.server.state import state_of


async def live(request: Request) -> JSONResponse:
    """GET /health/live: 200 while the process serves HTTP and every engine can still serve."""
    state = state_of(request)
    if not state.alive():
        dead = {m.id: m.engine.health().detail for m in state.models if not m.engine.health().alive}
        return JSONResponse({"status": "dead", "models": dead}, status_code=503)
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    """GET /health/ready: 200 when every model is loaded and warmed, else 503."""
    state = state_of(request)
    models = {m.id: m.engine.health().state for m in state.models}
    if state.draining:
        status = "draining"
    elif all(s == "ready" for s in models.values()):
        status = "ready"
    elif any(s in ("failed", "dead") for s in models.values()):
        status = "failed"
    else:
        status = "loading"
    code = 200 if status == "ready" else 503
    headers = None if code == 200 else {"Retry-After": str(state.settings.retry_after)}
    return JSONResponse({"status": status, "models": models}, status_code=code, headers=headers)


async def v2_live(request: Request) -> JSONResponse:
    """GET /v2/health/live (KServe Open Inference Protocol)."""
    ok = state_of(request).alive()
    return JSONResponse({"live": ok}, status_code=200 if ok else 503)


async def v2_ready(request: Request) -> JSONResponse:
    """GET /v2/health/ready (KServe Open Inference Protocol)."""
    ok = state_of(request).ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


async def v2_model_ready(request: Request) -> JSONResponse:
    """GET /v2/models/{name}/ready: the stable version and any canary both ready (never a random pick)."""
    model, ok = state_of(request).model_ready(request.path_params["name"])
    return JSONResponse({"name": model.id, "ready": ok}, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    """GET /metrics in Prometheus text format."""
    body = state_of(request).metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


def kserve_error(outcome: Outcome) -> Response:
    """KServe's error shape: ``{"error": "..."}``."""
    return JSONResponse({"error": outcome.message}, status_code=outcome.status)


OPS = Surface(
    "ops",
    (
        RouteSpec("/health/live", live, ("GET",), "open"),
        RouteSpec("/health/ready", ready, ("GET",), "open"),
        RouteSpec("/metrics", metrics, ("GET",), "metrics"),
    ),
    render_openai,
)
KSERVE = Surface(
    "kserve",
    (
        RouteSpec("/v2/health/live", v2_live, ("GET",), "open"),
        RouteSpec("/v2/health/ready", v2_ready, ("GET",), "open"),
        RouteSpec("/v2/models/{name:path}/ready", v2_model_ready, ("GET",), "infer"),
    ),
    kserve_error,
)
