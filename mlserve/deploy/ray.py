"""``mlserve deploy ray``: a Ray Serve config running ``mlserve.serving.ray_app`` (one engine per replica).

The config is Ray Serve's own (``serve deploy serve-config.yaml`` on a running cluster, or
``serve run serve-config.yaml``): the application's import path and arguments (bundles pinned
by digest and the ``serve`` settings), the deployment's replicas or autoscaling, how many
requests Ray sends a replica at once (its ``--parallel``: continuous batching inside, Ray's
router between), how long a stopping replica may drain, and the CPUs and memory each replica
reserves (memory from the bundle's estimate). Ray's proxy terminates HTTP (and TLS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mlserve.deploy import pod
from mlserve.deploy.plan import Plan, check_settings
from mlserve.errors import UsageError

IMPORT_PATH = "mlserve.serving.ray_app:build"
DEPLOYMENT = "mlserve"  # the deployment's name in mlserve/serving/ray_app.py
# Ray's proxy gives up on a request this long after mlserve's own deadline would have answered it (504).
PROXY_SLACK_S = 10


@dataclass(frozen=True)
class Options:
    """Settings only the Ray Serve target has."""

    app_name: str | None = field(default=None, metadata={"help": "Ray Serve application name (default: mlserve-NAME)."})
    replicas: int = field(default=2, metadata={"help": "Replicas (the fewest, with --max-replicas)."})
    max_replicas: int | None = field(
        default=None, metadata={"help": "Autoscale between --replicas and this many on ongoing requests."}
    )
    cpus_per_replica: int | None = field(
        default=None, metadata={"help": "CPUs each replica reserves (default: --threads, else 2)."}
    )
    gpus_per_replica: float = field(default=0.0, metadata={"help": "GPUs each replica reserves (with --gpu-layers)."})


def check(plan: Plan, opts: Options) -> None:
    """Refuse what a Ray Serve replica cannot honour (UsageError, exit 2)."""
    check_settings(plan.serve)
    s = plan.serve
    follows = [m.ref for m in plan.models if m.follows]
    if follows:
        raise UsageError(
            f"{follows[0]} follows a channel; Ray Serve replicas serve fixed versions.",
            "Deploy NAME:VERSION and roll out the next version with `serve deploy` of a new config.",
        )
    if opts.replicas < 1 or (opts.max_replicas is not None and opts.max_replicas < opts.replicas):
        raise UsageError(f"--max-replicas must be at least --replicas {opts.replicas}, which must be at least 1.")
    if s.tls_client_ca:
        raise UsageError(
            "Ray Serve's proxy terminates TLS but does not require client certificates.",
            "Drop --tls-client-ca, or put a proxy that checks them in front of Ray.",
        )
    if s.threads is not None and opts.cpus_per_replica is not None and s.threads > opts.cpus_per_replica:
        raise UsageError(f"--threads {s.threads} exceeds --cpus-per-replica {opts.cpus_per_replica}.")
    if plan.gpu and opts.gpus_per_replica <= 0:
        raise UsageError("--gpu-layers offloads to a GPU, but replicas reserve none.", "Pass --gpus-per-replica 1.")


def cpus(plan: Plan, opts: Options) -> int:
    """CPUs per replica: given, else ``--threads``, else 2."""
    return opts.cpus_per_replica or plan.serve.threads or 2


def app_args(plan: Plan, opts: Options) -> dict[str, Any]:
    """The builder's arguments (``mlserve.serving.asgi.ReplicaConfig``): digests and ``serve`` settings."""
    s = plan.serve
    args: dict[str, Any] = {"refs": [m.digest for m in plan.models]}
    for name, value in (("ctx_size", s.ctx_size), ("parallel", s.parallel), ("gpu_layers", s.gpu_layers)):
        if value is not None:
            args[name] = value
    # In a Ray worker llama.cpp would see the node's cores: match the CPUs the replica reserves.
    args["threads"] = s.threads or cpus(plan, opts)
    args.update(max_queue=s.max_queue, request_timeout=s.request_timeout, drain_timeout=s.drain_timeout)
    if s.route_prefix:
        args["route_prefix"] = s.route_prefix
    return args


def deployment(plan: Plan, opts: Options) -> dict[str, Any]:
    """The deployment: replicas or autoscaling, requests per replica, drain, and reserved resources."""
    # A replica takes as many requests as it decodes together; Ray's router holds the rest.
    ongoing = sum(m.parallel for m in plan.models)
    found: dict[str, Any] = {"name": DEPLOYMENT}
    if opts.max_replicas is None:
        found["num_replicas"] = opts.replicas
    else:
        found["autoscaling_config"] = {
            "min_replicas": opts.replicas,
            "max_replicas": opts.max_replicas,
            "target_ongoing_requests": ongoing,
        }
    actor: dict[str, Any] = {"num_cpus": cpus(plan, opts), "memory": plan.memory_bytes}
    if opts.gpus_per_replica:
        actor["num_gpus"] = opts.gpus_per_replica
    found.update(
        max_ongoing_requests=ongoing,
        max_queued_requests=plan.serve.max_queue,
        graceful_shutdown_timeout_s=plan.serve.drain_timeout,
        health_check_period_s=5,
        health_check_timeout_s=10,
        ray_actor_options=actor,
    )
    return found


def config(plan: Plan, opts: Options) -> dict[str, Any]:
    """The whole Ray Serve config file."""
    s = plan.serve
    http: dict[str, Any] = {"host": s.host, "port": s.port}
    if s.request_timeout:
        http["request_timeout_s"] = math.ceil(s.request_timeout + PROXY_SLACK_S)
    if s.tls_cert and s.tls_key:
        http.update(ssl_certfile=s.tls_cert, ssl_keyfile=s.tls_key)
    application = {
        "name": opts.app_name or f"mlserve-{plan.name}",
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "runtime_env": {"env_vars": {"MLSERVE_HOME": s.home}},
        "args": app_args(plan, opts),
        "deployments": [deployment(plan, opts)],
    }
    return {"proxy_location": "EveryNode", "http_options": http, "applications": [application]}


def render(plan: Plan, opts: Options) -> dict[str, str]:
    """``ray/serve-config.yaml``."""
    check(plan, opts)
    refs = ", ".join(f"{m.name}:{m.version} ({m.digest})" for m in plan.models)
    header = (
        f"Rendered by `mlserve deploy ray` for {refs}.\n"
        "Each Ray node serves from its own MLSERVE_HOME: `mlserve import` the bundle there (or share the folder),\n"
        "with keys.json for API keys. Then `serve deploy serve-config.yaml` on the cluster (or `serve run` it).\n"
        "Needs `pip install 'mlserve[ray]'` on every node."
    )
    return {"ray/serve-config.yaml": pod.dump([config(plan, opts)], header)}
