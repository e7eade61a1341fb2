"""The route registry: every route is declared once with its surface, scope and whether it is audited.

Auth reads the scope and the context middleware reads ``audited`` from here, so a new route
cannot fall through to "any key will do": a route without a scope cannot be declared.
A surface (OpenAI, Ollama, ...) is one module exposing a ``Surface``: its routes and how it
renders an error in its own wire shape. A route may also name its request schema and a summary:
``/openapi.json`` is generated from them (``server/openapi.py``), never written by hand.

A surface can be mounted again under a prefix (``serve --route-prefix /openai``, as KServe's LLM
runtimes serve ``/openai/v1/...``): the same ``RouteSpec``s with the prefix in front, so scope,
audit and the error shape carry over.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from mlserve.errors import UsageError
from mlserve.server.errors import Outcome

Endpoint = Callable[[Request], Awaitable[Response]]
# open: probes an orchestrator must reach without a key; infer: inference and model listing;
# metrics: Prometheus scrapes; admin: every scope.
Scope_ = Literal["open", "infer", "metrics", "admin"]
# One or more plain path segments: what a reverse proxy or KServe puts in front of a route.
_PREFIX = re.compile(r"(/[A-Za-z0-9._~-]+)+")


@dataclass(frozen=True)
class RouteSpec:
    """One HTTP route: where, what answers it, the key scope it needs and whether each request is audited."""

    path: str
    endpoint: Endpoint
    methods: tuple[str, ...]
    scope: Scope_
    audited: bool = False
    body: type[BaseModel] | None = None  # the JSON request body's schema (for /openapi.json)
    summary: str = ""  # one line for /openapi.json; the endpoint's docstring when empty
    streams: str | None = None  # the media type answered when the request asks to stream


@dataclass(frozen=True)
class Surface:
    """One wire protocol: its routes and its error shape."""

    name: str
    routes: tuple[RouteSpec, ...]
    render_error: Callable[[Outcome], Response]


@dataclass(frozen=True)
class Matched:
    """The surface and route a request path belongs to."""

    surface: Surface
    spec: RouteSpec


class Registry:
    """Every surface's routes, matched the way starlette's router matches them."""

    def __init__(self, surfaces: Sequence[Surface], fallback: Surface, mounts: Sequence[tuple[str, str]] = ()) -> None:
        """Declare every surface's routes, then each ``(prefix, surface name)`` mount's again under its prefix."""
        self.surfaces = tuple(surfaces) + tuple(_mounted(surfaces, mounts))
        self.fallback = fallback  # renders errors for paths no surface declares
        self._routes: list[tuple[Route, Matched]] = []
        seen: set[tuple[str, str]] = set()
        for surface in self.surfaces:
            for spec in surface.routes:
                for method in spec.methods:
                    if (spec.path, method) in seen:  # also a --route-prefix or AIP_* route that lands on another
                        raise UsageError(
                            f"Route {method} {spec.path} is declared twice.",
                            "Choose a --route-prefix, AIP_PREDICT_ROUTE or AIP_HEALTH_ROUTE that no other route uses.",
                        )
                    seen.add((spec.path, method))
                route = Route(spec.path, spec.endpoint, methods=list(spec.methods))
                self._routes.append((route, Matched(surface, spec)))

    def routes(self) -> list[Route]:
        """The starlette routes, in declaration order."""
        return [route for route, _ in self._routes]

    def match(self, scope: Scope) -> Matched | None:
        """The declared route for this request (a path match with another method still counts)."""
        partial: Matched | None = None
        for route, matched in self._routes:
            found, _ = route.matches(scope)
            if found == Match.FULL:
                return matched
            if found == Match.PARTIAL and partial is None:
                partial = matched
        return partial

    def specs(self) -> list[RouteSpec]:
        """Every declared route (for tests and the README's surface table)."""
        return [m.spec for _, m in self._routes]

    def declared(self) -> list[Matched]:
        """Every declared route with its surface, in declaration order (for /openapi.json)."""
        return [m for _, m in self._routes]


def check_prefix(prefix: str) -> str:
    """``prefix`` without a trailing slash; UsageError unless it is ``/segment[/segment...]``."""
    cleaned = prefix.rstrip("/")
    if not _PREFIX.fullmatch(cleaned):
        raise UsageError(
            f"Invalid route prefix {prefix!r}.",
            "Give one or more path segments starting with '/', e.g. --route-prefix /openai.",
        )
    return cleaned


def _mounted(surfaces: Sequence[Surface], mounts: Sequence[tuple[str, str]]) -> list[Surface]:
    by_name = {s.name: s for s in surfaces}
    out = []
    for prefix, name in mounts:
        if name not in by_name:
            raise ValueError(f"cannot mount unknown surface {name!r}")
        base = by_name[name]
        clean = check_prefix(prefix)
        routes = tuple(replace(spec, path=clean + spec.path) for spec in base.routes)
        out.append(Surface(base.name, routes, base.render_error))
    return out
