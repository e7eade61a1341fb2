"""A deployment plan: the one value every ``mlserve deploy`` target renders from.

The interface between ``mlserve deploy`` (``mlserve/cli/deploy_cmd.py``) and the renderers,
one module per target in this package (``systemd``, ``haproxy``, ``k8s``, ``kserve``, ``ray``)::

    plan = build_plan(store, refs, ServeSettings(...))     # reads bundles from the store, nothing else
    files = mlserve.deploy.<target>.render(plan, opts)    # -> {relative path: file text}

Each target module defines

- ``Options``: a frozen dataclass of the settings only that target has. Every field has a
  default and ``metadata={"help": "..."}``; the CLI turns each field into a flag
  (``field_name`` -> ``--field-name``; ``bool`` -> ``--x/--no-x``; ``tuple[str, ...]`` ->
  a repeatable flag; ``int``, ``float``, ``str`` or ``X | None`` of those -> one value).
- ``render(plan: Plan, opts: Options) -> dict[str, str]``: path (relative to ``-o DIR``) to
  file text. Inconsistent settings raise ``mlserve.errors.UsageError`` (exit 2) whose
  message names both settings and the rule, e.g. "grace period 20 s is shorter than the
  drain timeout 30 s". Renderers are pure: no disk, no network, no clock.
- Imports: the standard library and mlserve core only (``mlserve deploy`` imports every
  target module to build its flags, so a heavy import would slow every ``mlserve`` command).

Everything a target needs from the bundle and from ``mlserve serve`` is on ``Plan``:
digests (to pin), memory estimate (limits), context and parallelism, timeouts, probe paths,
TLS and API-key settings, and ``serve_args()``, the exact ``mlserve serve`` command line.
Paths in ``ServeSettings`` are paths on the *target* host (or in the container), never read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlserve.bundles.store import Bundle, Store
from mlserve.deploy.memory import RUNTIME_BYTES, KVShape, kv_bytes, kv_shape
from mlserve.errors import UsageError

# What `mlserve serve` answers on (mlserve/server/health.py); probes must use one of these.
READY_PATHS = ("/health/ready", "/v2/health/ready")
LIVE_PATHS = ("/health/live", "/v2/health/live")
# `mlserve serve`'s own defaults when neither a flag nor the recipe sets them
# (mirrors mlserve/engine/llama/factory.py, which core code may not import).
DEFAULT_CTX_SIZE = 4096
DEFAULT_PARALLEL = 8


@dataclass(frozen=True)
class ServeSettings:
    """How ``mlserve serve`` runs on the target: each field maps to one ``serve`` flag or env var."""

    host: str = "127.0.0.1"
    port: int = 8000
    ctx_size: int | None = None  # None: the bundle's recipe default, else DEFAULT_CTX_SIZE
    parallel: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    request_timeout: float = 600.0  # 0: no deadline
    drain_timeout: float = 30.0
    max_queue: int = 64
    tls_cert: str | None = None  # paths on the target host / in the container
    tls_key: str | None = None
    tls_client_ca: str | None = None
    api_keys: bool = False  # the server has keys (a non-loopback bind needs TLS and keys)
    insecure: bool = False  # `serve --insecure`: non-loopback without TLS and keys
    home: str = "/var/lib/mlserve"  # MLSERVE_HOME on the target
    exec_path: str = "/usr/local/bin/mlserve"  # the mlserve executable on the target
    route_prefix: str | None = None  # KServe: OpenAI routes also under this prefix
    ready_path: str = "/health/ready"
    live_path: str = "/health/live"
    extra_args: tuple[str, ...] = ()  # more `serve` flags, passed through verbatim

    @property
    def tls(self) -> bool:
        """Whether the server speaks HTTPS."""
        return bool(self.tls_cert)

    @property
    def scheme(self) -> str:
        """``https`` with TLS, else ``http``."""
        return "https" if self.tls else "http"


@dataclass(frozen=True)
class ModelPlan:
    """One served bundle: what is pinned and what it costs in memory."""

    ref: str  # as served: NAME@CHANNEL follows the channel, NAME:VERSION is pinned
    name: str
    version: str
    digest: str  # sha256: of the manifest
    model_sha256: str
    model_bytes: int
    ctx_size: int  # cells per sequence
    parallel: int  # sequences decoded together
    gpu_layers: int
    kv: KVShape | None  # None when the GGUF lacks the keys (estimate then uses model bytes only)
    follows: str | None = None  # the channel, when the ref is NAME@CHANNEL

    @property
    def kv_bytes(self) -> int:
        """KV cache bytes: ctx × parallel cells × per-cell bytes (an upper bound; sliding windows need less)."""
        return kv_bytes(self.kv, self.ctx_size * self.parallel) if self.kv else 0

    @property
    def memory_bytes(self) -> int:
        """Model + KV cache; twice that when following a channel (the new version warms beside the old)."""
        one = self.model_bytes + self.kv_bytes
        return 2 * one if self.follows else one


@dataclass(frozen=True)
class Plan:
    """Everything a target renders from: the models, how ``serve`` runs, and what they cost."""

    models: tuple[ModelPlan, ...]
    serve: ServeSettings = field(default_factory=ServeSettings)

    @property
    def name(self) -> str:
        """A name for units, services and backends: the first model's name."""
        return self.models[0].name

    @property
    def memory_bytes(self) -> int:
        """Estimated peak resident memory of one server: models, KV caches and the runtime."""
        return RUNTIME_BYTES + sum(m.memory_bytes for m in self.models)

    @property
    def gpu(self) -> bool:
        """Whether any model offloads layers to a GPU."""
        return any(m.gpu_layers != 0 for m in self.models)

    def serve_args(self) -> list[str]:
        """The ``mlserve serve`` arguments (without the executable) that run this plan."""
        s = self.serve
        args = ["serve", *(m.ref for m in self.models), "--host", s.host, "--port", str(s.port)]
        # Per-model settings are passed only when the user set them: each bundle keeps its recipe's.
        for flag, value in (
            ("--ctx-size", s.ctx_size),
            ("--parallel", s.parallel),
            ("--threads", s.threads),
            ("--gpu-layers", s.gpu_layers),
        ):
            if value is not None:
                args += [flag, str(value)]
        args += ["--request-timeout", _num(s.request_timeout), "--drain-timeout", _num(s.drain_timeout)]
        args += ["--max-queue", str(s.max_queue)]
        for flag, path in (("--tls-cert", s.tls_cert), ("--tls-key", s.tls_key), ("--tls-client-ca", s.tls_client_ca)):
            if path:
                args += [flag, path]
        if s.route_prefix:
            args += ["--route-prefix", s.route_prefix]
        if s.insecure:
            args.append("--insecure")
        return [*args, *s.extra_args]


def _num(value: float) -> str:
    """``30`` for 30.0, ``2.5`` for 2.5: what a user would type."""
    return str(int(value)) if float(value).is_integer() else str(value)


def check_settings(s: ServeSettings) -> None:
    """Refuse settings ``mlserve serve`` would refuse or that no target can probe (UsageError, exit 2)."""
    if s.ready_path not in READY_PATHS:
        raise UsageError(
            f"Readiness probe path {s.ready_path!r} is not served by mlserve.",
            f"Use one of {', '.join(READY_PATHS)}.",
        )
    if s.live_path not in LIVE_PATHS:
        raise UsageError(
            f"Liveness probe path {s.live_path!r} is not served by mlserve.", f"Use one of {', '.join(LIVE_PATHS)}."
        )
    if not 0 < s.port < 65536:
        raise UsageError(f"Port {s.port} is out of range.", "Use 1 to 65535.")
    if s.request_timeout < 0 or s.drain_timeout < 0:
        raise UsageError("--request-timeout and --drain-timeout cannot be negative.")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise UsageError("TLS needs both --tls-cert and --tls-key.")
    if s.tls_client_ca and not s.tls_cert:
        raise UsageError("--tls-client-ca needs --tls-cert and --tls-key.")
    if s.route_prefix is not None and (not s.route_prefix.startswith("/") or s.route_prefix.endswith("/")):
        raise UsageError(f"Route prefix {s.route_prefix!r} must start with '/' and not end with one.")
    loopback = s.host in ("127.0.0.1", "::1", "localhost")
    if not loopback and not s.insecure and not (s.tls and s.api_keys):
        raise UsageError(
            f"`mlserve serve --host {s.host}` refuses to start without TLS and API keys.",
            "Pass --tls-cert/--tls-key and --api-keys, or --insecure if this network is trusted.",
        )


def model_plan(store: Store, ref: str, settings: ServeSettings) -> ModelPlan:
    """Resolve ``ref`` and read what its plan needs: digest, size, serving defaults, KV shape."""
    bundle: Bundle = store.resolve(ref)
    defaults = bundle.manifest.get("serving", {}).get("defaults", {})

    def pick(flag: int | None, key: str, fallback: int) -> int:
        if flag is not None:
            return flag
        value = defaults.get(key)
        return int(value) if value is not None else fallback

    sha = bundle.model_sha256
    blob = store.blob_path(sha)
    return ModelPlan(
        ref=ref if "@" in ref else bundle.ref,  # pin anything that is not a channel
        name=bundle.name,
        version=bundle.version,
        digest=bundle.digest,
        model_sha256=sha,
        model_bytes=_model_size(bundle, blob),
        ctx_size=pick(settings.ctx_size, "ctx_size", DEFAULT_CTX_SIZE),
        parallel=pick(settings.parallel, "parallel", DEFAULT_PARALLEL),
        gpu_layers=pick(settings.gpu_layers, "gpu_layers", 0),
        kv=kv_shape(blob),
        follows=ref.split("@", 1)[1] if "@" in ref else None,
    )


def _model_size(bundle: Bundle, blob: Path) -> int:
    for entry in bundle.manifest["files"]:
        if entry.get("role", "model") == "model" and "size" in entry:
            return int(entry["size"])
    return blob.stat().st_size


def build_plan(store: Store, refs: list[str], settings: ServeSettings) -> Plan:
    """The plan for serving ``refs`` from ``store`` with ``settings``; UsageError on bad settings."""
    if not refs:
        raise UsageError("Name at least one bundle to deploy.")
    check_settings(settings)
    return Plan(models=tuple(model_plan(store, ref, settings) for ref in refs), serve=settings)
