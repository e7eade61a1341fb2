"""What a running server holds: its models, settings, metrics and drain state."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from mlserve.engine.base import Engine
from mlserve.engine.scheduler import StepStats
from mlserve.errors import NotFoundError
from mlserve.server.metrics import Metrics


@dataclass(frozen=True)
class ServerSettings:
    """Server limits; each comes from a CLI flag, then MLSERVE_* environment, then this default."""

    request_timeout: float | None = 600.0
    drain_timeout: float = 30.0
    max_body_bytes: int = 4 << 20
    max_tokens_cap: int | None = None
    retry_after: int = 1
    # Security (issue 8): None means off, so apps built directly (tests) run keyless and unaudited.
    keys_file: str | None = None
    audit_dir: str | None = None
    rate_limit: int = 0
    log_content: bool = False


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

    @property
    def id(self) -> str:
        """``NAME:VERSION``."""
        return f"{self.name}:{self.version}"


class ServerState:
    """Shared by every route; everything here is read from the event loop."""

    def __init__(self, models: list[ServedModel], settings: ServerSettings) -> None:
        self.models = models
        self.settings = settings
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
            sched = getattr(m.engine, "scheduler", None)
            if sched is not None:
                out.append((m.id, sched.stats))
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

    def public_ids(self) -> list[tuple[str, ServedModel]]:
        """The ids clients may send: NAME for each model, and NAME:VERSION."""
        return sorted(self._by_name.items())
