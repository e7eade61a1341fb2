"""What a running server holds: its models, settings, metrics and drain state."""

from __future__ import annotations

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
        return model

    def ready(self) -> bool:
        """Every model loaded and warmed, and not draining."""
        return not self.draining and all(m.engine.health().ready for m in self.models)

    def public_ids(self) -> list[tuple[str, ServedModel]]:
        """The ids clients may send: NAME for each model, and NAME:VERSION."""
        return sorted(self._by_name.items())
