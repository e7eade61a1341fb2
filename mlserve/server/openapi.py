"""``GET /openapi.json``: an OpenAPI 3.1 document generated from the route registry, never by hand.

Every declared route of every surface (fixed, mounted under ``--route-prefix``, or configured
like Vertex AI's) becomes an operation; a route's request schema is its ``RouteSpec.body``
(pydantic's JSON Schema, ``$defs`` moved to ``components/schemas`` under ``SURFACE.Name``, since
surfaces reuse names such as ``ChatRequest``). Error responses carry an
example rendered by the surface's own error renderer from the server's one error table, so the
document shows each surface's real error shape. The route is open: it holds no secrets, and
client generators and API fuzzers fetch it without a key.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse

from mlserve import __version__
from mlserve.engine.api import DeadlineExceeded, Unavailable
from mlserve.errors import NotFoundError
from mlserve.server.errors import (
    BadBody,
    BodyTooLarge,
    Forbidden,
    RateLimited,
    Unauthorized,
    outcome_of,
    render_openai,
)
from mlserve.server.registry import Matched, Registry, RouteSpec, Surface

SCHEMAS = "#/components/schemas/"
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}")  # starlette's {name} and {name:path}
# A representative error per status, mapped through the server's one error table.
_ERRORS: dict[int, BaseException] = {
    400: BadBody("Invalid request: 'messages' Field required."),
    401: Unauthorized("A valid API key is required: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'."),
    403: Forbidden("This API key lacks the 'infer' scope needed here."),
    404: NotFoundError("The requested model is not served here; GET /v1/models lists the models served."),
    413: BodyTooLarge("The request body is larger than the 4194304-byte limit."),
    429: RateLimited("Rate limit exceeded; retry later.", 1),
    503: Unavailable("The model is not ready (loading)."),
    504: DeadlineExceeded("The request's deadline passed; generation was stopped."),
}
_DESCRIPTIONS = {
    400: "Malformed or out-of-range input (never truncated silently).",
    401: "Missing or invalid API key.",
    403: "The API key lacks this route's scope.",
    404: "Unknown model (never a fallback to another one).",
    413: "Request body too large.",
    429: "Rate limited (see Retry-After).",
    503: "Overloaded, not ready or draining (see Retry-After).",
    504: "Deadline exceeded; generation was stopped.",
}
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "An mlserve API key."},
    "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "An mlserve API key."},
}


def document(registry: Registry) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route ``registry`` declares."""
    declared = registry.declared()
    refs, schemas = _schemas(declared)
    paths: dict[str, dict[str, Any]] = {}
    for matched in declared:
        path, params = _path(matched.spec.path)
        for method in matched.spec.methods:
            op = _operation(matched, method, params)
            if matched.spec.body is not None:
                schema = refs[(matched.surface.name, matched.spec.body)]
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlserve",
            "version": __version__,
            "description": "Every wire protocol this server speaks, generated from its route registry.",
        },
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": SECURITY_SCHEMES},
    }


def _schemas(declared: list[Matched]) -> tuple[dict[tuple[str, type[BaseModel]], Any], dict[str, Any]]:
    """Each surface's request schemas, named ``SURFACE.Model``; and the refs to them by (surface, model)."""
    by_surface: dict[str, list[type[BaseModel]]] = {}
    for m in declared:
        models = by_surface.setdefault(m.surface.name, [])
        if m.spec.body is not None and m.spec.body not in models:
            models.append(m.spec.body)
    refs: dict[tuple[str, type[BaseModel]], Any] = {}
    schemas: dict[str, Any] = {}
    for name, models in by_surface.items():
        if not models:
            continue
        keys, defs = models_json_schema([(m, "validation") for m in models], ref_template=f"{SCHEMAS}{name}.{{model}}")
        refs.update({(name, model): ref for (model, _), ref in keys.items() if issubclass(model, BaseModel)})
        schemas.update({f"{name}.{key}": value for key, value in defs.get("$defs", {}).items()})
    return refs, schemas


def _path(path: str) -> tuple[str, list[dict[str, Any]]]:
    """A starlette path as an OpenAPI path and its path parameters."""
    names = _PARAM.findall(path)
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]
    return _PARAM.sub(r"{\1}", path), params


def _operation(matched: Matched, method: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    spec, surface = matched.spec, matched.surface
    doc = (spec.endpoint.__doc__ or "").strip().splitlines()
    op: dict[str, Any] = {
        "operationId": f"{surface.name}_{method.lower()}_{re.sub(r'[^A-Za-z0-9]+', '_', spec.path).strip('_')}",
        "summary": spec.summary or (doc[0] if doc else spec.path),
        "tags": [surface.name],
        "responses": _responses(spec, surface),
    }
    if params:
        op["parameters"] = params
    # open: no key needed; every other scope takes the key as a bearer token or in x-api-key.
    op["security"] = [] if spec.scope == "open" else [{"bearer": []}, {"apiKey": []}]
    return op


def _responses(spec: RouteSpec, surface: Surface) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {}}}
    if spec.streams:
        content[spec.streams] = {"schema": {"type": "string"}}
    out: dict[str, Any] = {"200": {"description": "Success.", "content": content}}
    statuses: list[int] = []
    if spec.scope != "open":
        statuses += [401, 403, 429]
    if spec.body is not None or spec.audited:
        statuses += [400, 413]
    if spec.audited:
        statuses += [404, 503, 504]
    for status in sorted(statuses):
        example = json.loads(bytes(surface.render_error(outcome_of(_ERRORS[status])).body))
        out[str(status)] = {
            "description": _DESCRIPTIONS[status],
            "content": {"application/json": {"schema": {}, "example": example}},
        }
    return out


async def openapi_json(request: Request) -> JSONResponse:
    """GET /openapi.json: this server's OpenAPI 3.1 document."""
    doc: dict[str, Any] | None = getattr(request.app.state, "openapi", None)
    if doc is None:  # built once per app: the registry never changes after create_app
        doc = document(request.app.state.registry)
        request.app.state.openapi = doc
    return JSONResponse(doc)


SURFACE = Surface(
    "openapi",
    (RouteSpec("/openapi.json", openapi_json, ("GET",), "open", summary="This OpenAPI 3.1 document."),),
    render_openai,
)
