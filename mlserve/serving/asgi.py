"""The ASGI app one replica of a serving framework runs: stored bundles -> engines -> the mlserve app.

``mlserve serve`` runs one process with uvicorn; a framework such as Ray Serve runs the same
starlette app in each of its replicas and routes between them. What differs is only how the
app starts: a replica must not be counted as up before its models are loaded and warmed, so
``ReadyGate`` holds the ASGI lifespan startup until every engine is ready (or reports why not),
and ``ReplicaHeader`` names the replica that answered in ``x-mlserve-replica``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlserve.bundles.store import Bundle, Store
from mlserve.engine.llama.factory import Overrides, create_engine, engine_config
from mlserve.errors import IntegrityError, UsageError
from mlserve.security.audit import audit_dir
from mlserve.security.keys import keys_path
from mlserve.server.app import create_app
from mlserve.server.registry import check_prefix
from mlserve.server.settings import ServerSettings
from mlserve.server.state import ServedModel, ServerState

REPLICA_HEADER = "x-mlserve-replica"
_INT_FIELDS = ("ctx_size", "parallel", "threads", "gpu_layers", "max_queue", "max_tokens_cap", "rate_limit")
_FLOAT_FIELDS = ("request_timeout", "drain_timeout")


@dataclass(frozen=True)
class ReplicaConfig:
    """What one replica serves and how: the ``mlserve serve`` settings a framework passes as plain values."""

    refs: tuple[str, ...]
    ctx_size: int | None = None
    parallel: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    max_queue: int = 64
    max_tokens_cap: int | None = None
    request_timeout: float = 600.0  # 0: no deadline
    drain_timeout: float = 30.0
    rate_limit: int = 600  # requests per minute per API key, as `serve --rate-limit`
    route_prefix: str | None = None  # the OpenAI routes again under this prefix, as `serve --route-prefix`

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ReplicaConfig:
        """Parse builder arguments (strings from ``serve run ... key=value``, or typed values from a config file)."""
        known = {"refs", "route_prefix", *_INT_FIELDS, *_FLOAT_FIELDS}
        unknown = sorted(set(args) - known)
        if unknown:
            raise UsageError(
                f"Unknown mlserve setting(s): {', '.join(unknown)}.", f"Known settings: {', '.join(sorted(known))}."
            )
        refs = args.get("refs")
        if isinstance(refs, str):
            refs = [r for r in refs.split(",") if r]
        if not refs or not all(isinstance(r, str) for r in refs):
            raise UsageError("Name the bundles to serve: refs=NAME[,NAME...] (or a list in the config file).")
        values: dict[str, Any] = {}
        for name in _INT_FIELDS:
            if args.get(name) is not None:
                values[name] = _number(name, args[name], int)
        for name in _FLOAT_FIELDS:
            if args.get(name) is not None:
                values[name] = _number(name, args[name], float)
        if args.get("route_prefix") is not None:
            values["route_prefix"] = check_prefix(str(args["route_prefix"]))
        return cls(refs=tuple(refs), **values)

    def overrides(self) -> Overrides:
        """The engine settings, as ``mlserve serve`` flags would give them."""
        return Overrides(
            ctx_size=self.ctx_size,
            parallel=self.parallel,
            threads=self.threads,
            gpu_layers=self.gpu_layers,
            max_queue=self.max_queue,
        )

    def settings(self) -> ServerSettings:
        """The server settings; keys and audit log under this node's ``$MLSERVE_HOME``, as ``serve`` uses them."""
        return ServerSettings(
            request_timeout=self.request_timeout or None,
            drain_timeout=self.drain_timeout,
            max_tokens_cap=self.max_tokens_cap,
            keys_file=str(keys_path()),
            audit_dir=str(audit_dir()),
            rate_limit=self.rate_limit,
            route_prefix=self.route_prefix,
        )


def _number(name: str, value: Any, kind: type[int] | type[float]) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"Setting {name} must be a number, not {value!r}.") from None
    if number < 0:
        raise UsageError(f"Setting {name} cannot be negative.")
    return number


def served_model(store: Store, bundle: Bundle, overrides: Overrides) -> ServedModel:
    """The ServedModel for ``bundle``: its engine from the one factory, its request defaults (serve and Ray)."""
    serving = bundle.manifest.get("serving", {})
    config = engine_config(store, bundle, overrides)
    created = int(dt.datetime.fromisoformat(bundle.manifest["created_at"].replace("Z", "+00:00")).timestamp())
    return ServedModel(
        name=bundle.name,
        version=bundle.version,
        digest=bundle.digest,
        engine=create_engine(config),
        defaults=dict(serving.get("defaults", {})),
        stop=config.stop,
        created=created,
        size=sum(int(f.get("size", 0)) for f in bundle.manifest["files"] if f.get("role", "model") == "model"),
        gguf=dict(bundle.manifest.get("gguf", {})),
        ctx_size=config.ctx_size,
        embeddings=config.embeddings,
    )


def build_app(config: ReplicaConfig, store: Store | None = None) -> Starlette:
    """The mlserve app for ``config``; bundles whose blobs fail verification are refused, as ``serve`` does."""
    store = store or Store()
    bundles = [store.resolve(ref) for ref in config.refs]
    for bundle in bundles:
        problems = store.verify(bundle)
        if problems:
            raise IntegrityError(
                f"Refusing to serve {bundle.ref}: {problems[0]}.", "Run `mlserve verify` and re-pull the bundle."
            )
    models = [served_model(store, b, config.overrides()) for b in bundles]
    return create_app(models, config.settings())


class ReadyGate:
    """Holds the lifespan's ``startup.complete`` until every model is ready; a model that fails fails the startup."""

    def __init__(self, app: Starlette, poll: float = 0.05) -> None:
        self.app = app
        self.poll = poll

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def gated(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                problem = await self.loaded()
                if problem is not None:
                    message = {"type": "lifespan.startup.failed", "message": problem}
            await send(message)

        await self.app(scope, receive, gated)

    async def loaded(self) -> str | None:
        """Wait until the models are ready (None) or one has failed (why)."""
        state: ServerState = self.app.state.mlserve
        while True:
            healths = [(m.id, m.engine.health()) for m in state.models]
            failed = [f"{ident}: {h.detail or h.state}" for ident, h in healths if h.state in ("failed", "dead")]
            if failed:
                return "Model failed to load: " + "; ".join(failed)
            if all(h.ready for _, h in healths):
                return None
            await asyncio.sleep(self.poll)  # the engines report no event to wait on; loading takes seconds


class ReplicaHeader:
    """Adds ``x-mlserve-replica: ID`` to every HTTP response, so clients and tests see which replica answered."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REPLICA_HEADER] = self.replica
            await send(message)

        await self.app(scope, receive, named)
