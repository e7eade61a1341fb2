"""The route registry: every route is declared once with its surface, scope and whether it is audited.

Auth reads the scope and the context middleware reads ``audited`` from here, so a new route
cannot fall through to "any key will do": a route without a scope cannot be declared.
A surface (OpenAI, Ollama, ...) is one module exposing a ``Surface``: its routes and how it
renders an error in its own wire shape.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from mlserve.server.errors import Outcome

Endpoint = Callable[[Request], Awaitable[Response]]
# open: probes an orchestrator must reach without a key; infer: inference and model listing;
# metrics: Prometheus scrapes; admin: every scope.
Scope_ = Literal["open", "infer", "metrics", "admin"]


@dataclass(frozen=True)
class RouteSpec:
    """One HTTP route: where, what answers it, the key scope it needs and whether each request is audited."""

    path: str
    endpoint: Endpoint
    methods: tuple[str, ...]
    scope: Scope_
    audited: bool = False


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

    def __init__(self, surfaces: Sequence[Surface], fallback: Surface) -> None:
        self.surfaces = tuple(surfaces)
        self.fallback = fallback  # renders errors for paths no surface declares
        self._routes: list[tuple[Route, Matched]] = []
        seen: set[tuple[str, str]] = set()
        for surface in self.surfaces:
            for spec in surface.routes:
                for method in spec.methods:
                    if (spec.path, method) in seen:
                        raise ValueError(f"route {method} {spec.path} is declared twice")
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
