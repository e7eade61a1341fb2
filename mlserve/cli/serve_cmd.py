"""``mlserve serve``: run the OpenAI-compatible server over stored bundles."""

from __future__ import annotations

import logging
import os
from enum import Enum
from typing import Any, Optional

import typer

import mlserve.cli.serve_security as serve_security
from mlserve.bundles.store import Store
from mlserve.cli.app import app
from mlserve.cli.console import info
from mlserve.errors import IntegrityError
from mlserve.security.audit import audit_dir
from mlserve.security.keys import keys_path


class LogLevel(str, Enum):
    """Server log levels."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _follow_plan(store: Store, refs: list[str], models: list[Any], overrides: Any) -> Any:
    """Models served as NAME@CHANNEL follow their channel: a FollowPlan, or None when there are none."""
    from mlserve.server.follow import FollowPlan
    from mlserve.serving.asgi import served_model

    pairs = tuple((m, ref.split("@", 1)[1]) for ref, m in zip(refs, models, strict=True) if "@" in ref)
    if not pairs:
        return None
    return FollowPlan(store, lambda bundle: served_model(store, bundle, overrides), pairs)


@app.command()
def serve(
    refs: list[str] = typer.Argument(..., help="Bundles to serve: NAME, NAME:VERSION, NAME@CHANNEL or sha256:HEX."),
    host: str = typer.Option("127.0.0.1", "--host", envvar="MLSERVE_HOST", help="Address to bind."),
    port: Optional[int] = typer.Option(
        None,
        "--port",
        envvar="MLSERVE_PORT",
        min=0,
        max=65535,
        help="Port (0 picks a free one; default: AIP_HTTP_PORT when Vertex AI sets it, else 8000).",
    ),
    parallel: Optional[int] = typer.Option(
        None, "--parallel", min=1, max=256, help="Sequences decoded together (default: the recipe's, else 8)."
    ),
    ctx_size: Optional[int] = typer.Option(
        None, "--ctx-size", min=16, help="Context (KV cells) per sequence (default: the recipe's, else 4096)."
    ),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads (default: all available)."),
    gpu_layers: Optional[str] = typer.Option(
        None,
        "--gpu-layers",
        help="Layers offloaded to the GPU: N, all (or -1), or auto (all that fit; 0 without a GPU). "
        "Default: the recipe's, else 0.",
    ),
    flash_attn: Optional[str] = typer.Option(
        None, "--flash-attn", help="Flash attention: on, off or auto (default: the recipe's, else auto)."
    ),
    cache_type_k: Optional[str] = typer.Option(
        None, "--cache-type-k", help="K cache type: f16 (default), bf16, f32, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl."
    ),
    cache_type_v: Optional[str] = typer.Option(
        None, "--cache-type-v", help="V cache type, as --cache-type-k; a quantized one needs --flash-attn on."
    ),
    split_mode: Optional[str] = typer.Option(
        None, "--split-mode", help="How several GPUs share the model: none, layer (default) or row."
    ),
    tensor_split: Optional[str] = typer.Option(
        None, "--tensor-split", help="Each GPU's share of the weights, e.g. 3,1 (one number per GPU)."
    ),
    main_gpu: Optional[int] = typer.Option(
        None, "--main-gpu", help="The GPU for the whole model with --split-mode none (default 0)."
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
    parse_special: bool = typer.Option(
        False,
        "--parse-special",
        help="Parse special tokens inside message text, as llama-server does (lets a user message fake turns).",
    ),
    embeddings: bool = typer.Option(
        False,
        "--embeddings",
        envvar="MLSERVE_EMBEDDINGS",
        help="Also answer embeddings requests (/v1/embeddings, /api/embed): a second context on the same weights.",
    ),
    embeddings_ctx: Optional[int] = typer.Option(
        None,
        "--embeddings-ctx",
        min=16,
        max=1 << 20,
        help="Longest embeddings input, in tokens (default 512); memory grows with it (~1 MiB a token for Gemma).",
    ),
    max_step_ms: Optional[float] = typer.Option(
        None,
        "--max-step-ms",
        min=10,
        help="Target time of a decode step while streams run (default: the recipe's, else 100): bounds the "
        "prompt tokens a newcomer adds per step, so others' tokens keep flowing. Lower: steadier streams, "
        "later first tokens.",
    ),
    speculate: Optional[bool] = typer.Option(
        None,
        "--speculate/--no-speculate",
        help="Prompt-lookup speculative decoding: verify drafts copied from the request's own prompt and output "
        "(default: the recipe's, else on; never for deterministic or structured-output requests).",
    ),
    draft_max: Optional[int] = typer.Option(
        None,
        "--draft-max",
        min=1,
        max=32,
        help="Most draft tokens a sequence verifies per step (default: the recipe's, else 8).",
    ),
    route_prefix: Optional[str] = typer.Option(
        None,
        "--route-prefix",
        envvar="MLSERVE_ROUTE_PREFIX",
        help="Also serve the OpenAI routes under this prefix, e.g. /openai for KServe (/openai/v1/...).",
    ),
    log_level: LogLevel = typer.Option(
        LogLevel.info, "--log-level", envvar="MLSERVE_LOG_LEVEL", case_sensitive=False, help="Server log level."
    ),
) -> None:
    """Serve bundles over an OpenAI-compatible HTTP API (loopback only by default)."""
    from mlserve.server.registry import check_prefix
    from mlserve.server.surfaces.vertex import vertex_env

    vertex = vertex_env(os.environ)  # Vertex AI custom containers: AIP_HTTP_PORT, AIP_PREDICT/HEALTH_ROUTE
    port = port if port is not None else vertex.port if vertex.port is not None else 8000
    if vertex.port is not None and serve_security.is_loopback(host):
        info("AIP_HTTP_PORT is set but --host is loopback: Vertex AI reaches the container on 0.0.0.0.")
    prefix = check_prefix(route_prefix) if route_prefix else None
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
    from mlserve.engine.llama.factory import Overrides
    from mlserve.engine.llama.gpu import parse_gpu_layers, parse_tensor_split
    from mlserve.server.app import create_app
    from mlserve.server.run import serve as run_server
    from mlserve.server.settings import ServerSettings

    overrides = Overrides(
        ctx_size=ctx_size,
        parallel=parallel,
        threads=threads,
        gpu_layers=parse_gpu_layers(gpu_layers) if gpu_layers is not None else None,
        max_queue=max_queue,
        parse_special_content=parse_special,
        embeddings=embeddings,
        embeddings_ctx=embeddings_ctx,
        max_step_ms=max_step_ms,
        speculate=speculate,
        draft_max=draft_max,
        flash_attn=flash_attn,
        cache_type_k=cache_type_k,
        cache_type_v=cache_type_v,
        split_mode=split_mode,
        tensor_split=parse_tensor_split(tensor_split) if tensor_split is not None else None,
        main_gpu=main_gpu,
    )
    from mlserve.serving.asgi import served_model

    models = [served_model(store, b, overrides) for b in bundles]
    follow = _follow_plan(store, refs, models, overrides)
    settings = ServerSettings(
        request_timeout=request_timeout or None,
        drain_timeout=drain_timeout,
        max_body_bytes=max_body,
        max_tokens_cap=max_tokens_cap,
        keys_file=str(keys_path()),
        audit_dir=str(audit_dir()),
        rate_limit=rate_limit,
        log_content=log_content,
        route_prefix=prefix,
        vertex_predict_route=vertex.predict_route,
        vertex_health_route=vertex.health_route,
    )
    info(f"serving {', '.join(b.ref for b in bundles)}")
    run_server(create_app(models, settings, follow), host, port, log_level.value, tls=tls)
