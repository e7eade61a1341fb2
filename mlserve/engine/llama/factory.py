"""The one place a bundle becomes an engine: manifest + overrides -> EngineConfig -> LlamaEngine.

``serve``, the channel follower, ``promote --check`` (smoke), ``bench`` and ``doctor`` all
build through here, so a serving setting is read from the manifest in exactly one way.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlserve.bundles.store import Bundle, Store
from mlserve.engine.api import Engine
from mlserve.engine.llama.config import EngineConfig, default_threads, load_model
from mlserve.engine.llama.engine import LlamaEngine
from mlserve.engine.llama.model import BuildInfo, LlamaModel, build_info

EMBEDDINGS_CTX = 512  # default longest embeddings input: its compute buffer is ~1 MiB a token with Gemma


@dataclass(frozen=True)
class Overrides:
    """Settings given on the command line; None means "the bundle's default, else ours"."""

    ctx_size: int | None = None
    parallel: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    max_queue: int = 64
    parse_special_content: bool = False  # --parse-special: llama-server's handling of control text in messages
    embeddings: bool = False  # --embeddings: also answer embeddings requests
    embeddings_ctx: int | None = None  # --embeddings-ctx: tokens per input and per embeddings decode


def engine_config(store: Store, bundle: Bundle, overrides: Overrides | None = None) -> EngineConfig:
    """How to run ``bundle``: a flag wins, then the recipe's serving default, then ours."""
    o = overrides or Overrides()
    serving = bundle.manifest.get("serving", {})
    defaults = serving.get("defaults", {})

    def pick(value: int | None, key: str, fallback: int | None) -> int | None:
        if value is not None:
            return value
        chosen = defaults.get(key)
        return int(chosen) if chosen is not None else fallback

    return EngineConfig(
        model_path=store.blob_path(bundle.model_sha256),
        model_id=bundle.ref,
        ctx_size=pick(o.ctx_size, "ctx_size", 4096) or 4096,
        parallel=pick(o.parallel, "parallel", 8) or 8,
        threads=pick(o.threads, "threads", None),
        gpu_layers=pick(o.gpu_layers, "gpu_layers", 0) or 0,
        max_queue=o.max_queue,
        chat_template=serving.get("chat_template"),
        stop=tuple(serving.get("stop", [])),
        parse_special_content=o.parse_special_content,
        embeddings=o.embeddings,
        embeddings_ctx=o.embeddings_ctx or EMBEDDINGS_CTX,
    )


def create_engine(config: EngineConfig) -> Engine:
    """A llama.cpp engine for ``config`` (not started: ``await engine.start()``)."""
    return LlamaEngine(config)


def open_model(config: EngineConfig) -> LlamaModel:
    """The bare model for ``config``, no scheduler (offline benches); blocking, close it after use."""
    return load_model(config)


__all__ = [
    "BuildInfo",
    "EngineConfig",
    "LlamaModel",
    "Overrides",
    "build_info",
    "create_engine",
    "default_threads",
    "engine_config",
    "open_model",
]
