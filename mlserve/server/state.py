"""What a running server holds: its models, settings, metrics and drain state."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from mlserve.engine.api import Engine, StepStats
from mlserve.errors import NotFoundError
from mlserve.server.auth import Guard
from mlserve.server.metrics import Metrics
from mlserve.server.settings import ServerSettings


@dataclass
class ServedModel:
    """One bundle version being served."""

    name: str
    version: str
    digest: str
    engine: Engine
    defaults: dict[str, Any] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    created: int = 0
    in_flight: int = 0  # requests routed here and not finished; a retired version closes at 0
    size: int = 0  # bytes of the GGUF blob (Ollama's /api/tags and /api/ps report it)
    gguf: dict[str, Any] = field(default_factory=dict)  # the manifest's GGUF facts (architecture, parameters, ...)
    ctx_size: int | None = None  # context cells per sequence (Ollama's options.num_ctx is checked against it)
    embeddings: bool = False  # served with --embeddings (Ollama's /api/show lists the capability)

    @property
    def id(self) -> str:
        """``NAME:VERSION``."""
        return f"{self.name}:{self.version}"


class ServerState:
    """Shared by every route; everything here is read from the event loop."""

    def __init__(self, models: list[ServedModel], settings: ServerSettings, guard: Guard) -> None:
        self.models = models
        self.settings = settings
        self.guard = guard
        self.draining = False
        self.in_flight = 0
        self.metrics = Metrics(self._stats)
        self._by_name: dict[str, ServedModel] = {}
        self._canary: dict[str, tuple[ServedModel, float]] = {}  # id -> (canary model, percent)
        for m in models:
            self._by_name.setdefault(m.name, m)
            self._by_name[m.id] = m

    def _stats(self) -> list[tuple[str, StepStats]]:
        out = []
        for m in self.models:
            stats = m.engine.stats()
            if stats is not None:
                out.append((m.id, stats))
        return out

    def lookup(self, name: str) -> ServedModel:
        """The model a client asked for; never a fallback to another one."""
        model = self._by_name.get(name)
        if model is None:
            raise NotFoundError("The requested model is not served here; GET /v1/models lists the models served.")
        canary = self._canary.get(name)
        if canary is not None and random.random() < canary[1] / 100:
            return canary[0]
        return model

    def route(self, ident: str, model: ServedModel, canary: tuple[ServedModel, float] | None = None) -> None:
        """Send requests for ``ident`` to ``model`` (and ``percent`` of them to a canary) from now on."""
        self._by_name[ident] = model
        if canary is None:
            self._canary.pop(ident, None)
        else:
            self._canary[ident] = canary

    def canary_of(self, ident: str) -> dict[str, Any]:
        """``{"canary": {"version", "percent"}}`` when ``ident`` has a canary, else ``{}`` (for /v1/models)."""
        canary = self._canary.get(ident)
        return {} if canary is None else {"canary": {"version": canary[0].version, "percent": canary[1]}}

    def routed(self, ident: str) -> ServedModel | None:
        """The model ``ident`` names now, canary aside."""
        return self._by_name.get(ident)

    def unroute(self, model: ServedModel) -> None:
        """Forget every id that names ``model`` and stop listing it as served."""
        for ident in [i for i, m in self._by_name.items() if m is model]:
            del self._by_name[ident]
        self.models = [m for m in self.models if m is not model]

    def ready(self) -> bool:
        """Every model loaded and warmed, and not draining."""
        return not self.draining and all(m.engine.health().ready for m in self.models)

    def alive(self) -> bool:
        """False once an engine can never serve again: liveness fails so an orchestrator restarts us."""
        return all(m.engine.health().alive for m in self.models)

    def model_ready(self, ident: str) -> tuple[ServedModel, bool]:
        """The model ``ident`` names and whether it answers now: its stable version and any canary ready."""
        model = self._by_name.get(ident)
        if model is None:
            raise NotFoundError("The requested model is not served here; GET /v1/models lists the models served.")
        canary = self._canary.get(ident)
        routed = [model] + ([canary[0]] if canary is not None else [])
        return model, not self.draining and all(m.engine.health().ready for m in routed)

    def public_ids(self) -> list[tuple[str, ServedModel]]:
        """The ids clients may send: NAME for each model, and NAME:VERSION."""
        return sorted(self._by_name.items())


def state_of(request: Request) -> ServerState:
    """The server state the app was created with (``app.state.mlserve``)."""
    state: ServerState = request.app.state.mlserve
    return state
