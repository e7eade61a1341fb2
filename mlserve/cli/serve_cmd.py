"""``mlserve serve``: run the OpenAI-compatible server over stored bundles."""

from __future__ import annotations

import datetime as dt
import logging
from enum import Enum
from typing import Any, Optional

import typer

from mlserve.audit import audit_dir
from mlserve.cli import serve_security
from mlserve.cli.app import app
from mlserve.cli.console import info
from mlserve.errors import IntegrityError
from mlserve.keys import keys_path
from mlserve.store import Bundle, Store


class LogLevel(str, Enum):
    """Server log levels."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _served(store: Store, bundle: Bundle, opts: dict[str, Optional[int]], max_queue: int):  # type: ignore[no-untyped-def]
    from mlserve.engine.llama_engine import EngineConfig, LlamaEngine
    from mlserve.server.state import ServedModel

    serving = bundle.manifest.get("serving", {})
    defaults = dict(serving.get("defaults", {}))

    def pick(key: str, fallback: Optional[int]) -> Optional[int]:
        value = opts.get(key)
        return value if value is not None else defaults.get(key, fallback)

    config = EngineConfig(
        model_path=store.blob_path(bundle.model_sha256),
        model_id=bundle.ref,
        ctx_size=int(pick("ctx_size", 4096) or 4096),
        parallel=int(pick("parallel", 8) or 8),
        threads=pick("threads", None),
        gpu_layers=int(pick("gpu_layers", 0) or 0),
        max_queue=max_queue,
        chat_template=serving.get("chat_template"),
        stop=tuple(serving.get("stop", [])),
    )
    created = int(dt.datetime.fromisoformat(bundle.manifest["created_at"].replace("Z", "+00:00")).timestamp())
    return ServedModel(
        name=bundle.name,
        version=bundle.version,
        digest=bundle.digest,
        engine=LlamaEngine(config),
        defaults=defaults,
        stop=config.stop,
        created=created,
    )


def _follow_plan(
    store: Store, refs: list[str], models: list[Any], opts: dict[str, Optional[int]], max_queue: int
) -> Any:
    """Models served as NAME@CHANNEL follow their channel: a FollowPlan, or None when there are none."""
    from mlserve.server.follow import FollowPlan

    pairs = tuple((m, ref.split("@", 1)[1]) for ref, m in zip(refs, models, strict=True) if "@" in ref)
    if not pairs:
        return None
    return FollowPlan(store, lambda bundle: _served(store, bundle, opts, max_queue), pairs)


@app.command()
def serve(
    refs: list[str] = typer.Argument(..., help="Bundles to serve: NAME, NAME:VERSION, NAME@CHANNEL or sha256:HEX."),
    host: str = typer.Option("127.0.0.1", "--host", envvar="MLSERVE_HOST", help="Address to bind."),
    port: int = typer.Option(8000, "--port", envvar="MLSERVE_PORT", help="Port (0 picks a free one)."),
    parallel: Optional[int] = typer.Option(
        None, "--parallel", min=1, max=256, help="Sequences decoded together (default: the recipe's, else 8)."
    ),
    ctx_size: Optional[int] = typer.Option(
        None, "--ctx-size", min=16, help="Context (KV cells) per sequence (default: the recipe's, else 4096)."
    ),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (default: all available)."),
    gpu_layers: Optional[int] = typer.Option(
        None, "--gpu-layers", min=-1, help="Layers to offload to the GPU (default: the recipe's, else 0)."
    ),
    request_timeout: float = typer.Option(
        600.0, "--request-timeout", envvar="MLSERVE_REQUEST_TIMEOUT", min=0, help="Per-request deadline (0: none)."
    ),
    drain_timeout: float = typer.Option(
        30.0,
        "--drain-timeout",
        envvar="MLSERVE_DRAIN_TIMEOUT",
        min=0,
        help="Seconds in-flight requests get on SIGTERM.",
    ),
    max_queue: int = typer.Option(64, "--max-queue", envvar="MLSERVE_MAX_QUEUE", min=0, help="Requests that may wait."),
    max_body: int = typer.Option(4 << 20, "--max-body", envvar="MLSERVE_MAX_BODY", min=1024, help="Body limit, bytes."),
    max_tokens_cap: Optional[int] = typer.Option(
        None, "--max-tokens-cap", envvar="MLSERVE_MAX_TOKENS_CAP", min=1, help="Refuse larger max_tokens."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback address without TLS and keys."),
    tls_cert: Optional[str] = typer.Option(
        None, "--tls-cert", envvar="MLSERVE_TLS_CERT", help="PEM certificate chain (turns on HTTPS)."
    ),
    tls_key: Optional[str] = typer.Option(None, "--tls-key", envvar="MLSERVE_TLS_KEY", help="PEM private key."),
    tls_client_ca: Optional[str] = typer.Option(
        None, "--tls-client-ca", envvar="MLSERVE_TLS_CLIENT_CA", help="Require client certificates signed by this CA."
    ),
    rate_limit: int = typer.Option(
        600,
        "--rate-limit",
        envvar="MLSERVE_RATE_LIMIT",
        min=0,
        help="Requests per minute per API key (keyless servers are not limited); 0: off.",
    ),
    log_content: bool = typer.Option(
        False, "--log-content", help="Log prompt and completion text at INFO (PHI!); off by default."
    ),
    log_level: LogLevel = typer.Option(
        LogLevel.info, "--log-level", envvar="MLSERVE_LOG_LEVEL", case_sensitive=False, help="Server log level."
    ),
) -> None:
    """Serve bundles over an OpenAI-compatible HTTP API (loopback only by default)."""
    tls = serve_security.load_tls(tls_cert, tls_key, tls_client_ca)
    serve_security.check_exposure(host, insecure, tls is not None)
    logging.basicConfig(level=log_level.value.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = Store()
    bundles = [store.resolve(ref) for ref in refs]
    for bundle in bundles:
        problems = store.verify(bundle)
        if problems:
            raise IntegrityError(
                f"Refusing to serve {bundle.ref}: {problems[0]}.", "Run `mlserve verify` and re-pull the bundle."
            )
        serve_security.check_chat_template(store, bundle)
    from mlserve.server.app import create_app
    from mlserve.server.run import serve as run_server
    from mlserve.server.state import ServerSettings

    opts = {"ctx_size": ctx_size, "parallel": parallel, "threads": threads, "gpu_layers": gpu_layers}
    models = [_served(store, b, opts, max_queue) for b in bundles]
    follow = _follow_plan(store, refs, models, opts, max_queue)
    settings = ServerSettings(
        request_timeout=request_timeout or None,
        drain_timeout=drain_timeout,
        max_body_bytes=max_body,
        max_tokens_cap=max_tokens_cap,
        keys_file=str(keys_path()),
        audit_dir=str(audit_dir()),
        rate_limit=rate_limit,
        log_content=log_content,
    )
    info(f"serving {', '.join(b.ref for b in bundles)}")
    run_server(create_app(models, settings, follow), host, port, log_level.value, tls=tls)
