"""Ray Serve: one mlserve engine per replica (continuous batching inside it), Ray's router between replicas.

The only module that imports ``ray`` (the ``mlserve[ray]`` extra). Each replica runs the
same starlette app as ``mlserve serve`` (keys, audit, metrics and every route included) as
the deployment's ASGI ingress; Ray's proxy and router spread requests over the replicas,
restart a replica whose actor dies, and scale by ``num_replicas`` or ``autoscaling_config``.
Start it from the command line or from the config ``mlserve deploy ray REF`` renders::

    serve run mlserve.serving.ray_app:build refs=gemma3-270m parallel=8 num_replicas=2
    serve deploy serve-config.yaml

Each node reads bundles, keys and the audit log from its own ``$MLSERVE_HOME``: import the
bundle on every node (``mlserve import``) or share the directory.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment
from starlette.types import ASGIApp

from mlserve.errors import EngineError, UsageError
from mlserve.server.state import ServerState
from mlserve.serving.asgi import ReadyGate, ReplicaConfig, ReplicaHeader, build_app

# Settings for Ray rather than for mlserve: taken out of the builder arguments.
_DEPLOYMENT_ARGS = ("num_replicas", "max_ongoing_requests")


class MlserveReplica:
    """One replica: verified bundles, their engines and the mlserve app; healthy while every engine lives."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.config = ReplicaConfig.from_args(args)
        self._state: ServerState | None = None

    async def __serve_build_asgi_app__(self) -> ASGIApp:
        """Build the app off the event loop (verifying a bundle hashes its whole GGUF); Ray runs its lifespan."""
        app = await asyncio.to_thread(build_app, self.config)
        self._state = app.state.mlserve
        replica = serve.get_replica_context().replica_tag
        return ReplicaHeader(ReadyGate(app), replica)

    def check_health(self) -> None:
        """Ray restarts a replica whose check fails: fail once an engine is dead for good (as /health/live does)."""
        if self._state is not None and not self._state.alive():
            dead = [m.id for m in self._state.models if not m.engine.health().alive]
            raise EngineError(f"Engine(s) {', '.join(dead)} died; this replica cannot serve.")


# The Ray Serve deployment: the replica class behind its late-bound ASGI ingress (the app is built in the replica).
DEPLOYMENT: Deployment = serve.deployment(name="mlserve", health_check_period_s=5, health_check_timeout_s=10)(
    serve.ingress()(MlserveReplica)
)


def build(args: dict[str, Any]) -> Application:
    """Ray Serve's app builder: ``refs``, ``mlserve serve`` settings, ``num_replicas``, ``max_ongoing_requests``."""
    args = dict(args)
    options: dict[str, Any] = {}
    for name in _DEPLOYMENT_ARGS:
        if name in args:
            try:
                options[name] = int(args.pop(name))
            except (TypeError, ValueError):
                raise UsageError(f"Setting {name} must be a whole number.") from None
    config = ReplicaConfig.from_args(args)  # refuse bad settings here, before any replica starts
    # A replica takes as many requests as it decodes together; Ray's router holds the rest and
    # sends each to whichever replica frees a sequence slot first.
    options.setdefault("max_ongoing_requests", config.parallel or 8)
    return DEPLOYMENT.options(**options).bind(args)
