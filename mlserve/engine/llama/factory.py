"""The one place a bundle becomes an engine: manifest + overrides -> EngineConfig -> LlamaEngine.

``serve``, the channel follower, ``promote --check`` (smoke), ``bench`` and ``doctor`` all
build through here, so a serving setting is read from the manifest in exactly one way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from mlserve.bundles.store import Bundle, Store
from mlserve.engine.api import Engine
from mlserve.engine.llama.backends import BuildInfo, build_info
from mlserve.engine.llama.config import EngineConfig, default_threads, load_model
from mlserve.engine.llama.engine import LlamaEngine
from mlserve.engine.llama.gpu import GpuSettings, check_devices, check_head_dims, normalise
from mlserve.engine.llama.model import LlamaModel
from mlserve.engine.tuning import Tuning
from mlserve.errors import UsageError

_log = logging.getLogger(__name__)
EMBEDDINGS_CTX = 512  # default longest embeddings input: its compute buffer is ~1 MiB a token with Gemma


@dataclass(frozen=True)
class Overrides:
    """Settings given on the command line; None means "the bundle's default, else ours"."""

    ctx_size: int | None = None
    parallel: int | None = None
    threads: int | None = None
    gpu_layers: int | str | None = None  # N, "all" (or -1), "auto"
    max_queue: int = 64
    parse_special_content: bool = False  # --parse-special: llama-server's handling of control text in messages
    embeddings: bool = False  # --embeddings: also answer embeddings requests
    embeddings_ctx: int | None = None  # --embeddings-ctx: tokens per input and per embeddings decode
    # serve's GPU and KV-cache flags (engine/llama/gpu.py); None: the recipe's, else llama.cpp's default.
    flash_attn: str | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    split_mode: str | None = None
    tensor_split: tuple[float, ...] | None = None
    main_gpu: int | None = None
    # The batching scheduler (engine/tuning.py): --max-step-ms, --speculate/--no-speculate, --draft-max;
    # None: tuning.py's default.
    max_step_ms: float | None = None
    speculate: bool | None = None
    draft_max: int | None = None


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

    gpu = gpu_settings(o, defaults)
    model_path = store.blob_path(bundle.model_sha256)
    if (gpu.cache_type_k, gpu.cache_type_v) != ("f16", "f16"):
        from mlserve.engine.llama.hardware import head_dims

        check_head_dims(gpu, head_dims(model_path))
    return EngineConfig(
        model_path=model_path,
        model_id=bundle.ref,
        ctx_size=pick(o.ctx_size, "ctx_size", 4096) or 4096,
        parallel=pick(o.parallel, "parallel", 8) or 8,
        threads=pick(o.threads, "threads", None),
        gpu_layers=gpu.gpu_layers,
        gpu=gpu,
        max_queue=o.max_queue,
        chat_template=serving.get("chat_template"),
        stop=tuple(serving.get("stop", [])),
        parse_special_content=o.parse_special_content,
        embeddings=o.embeddings,
        embeddings_ctx=o.embeddings_ctx or EMBEDDINGS_CTX,
        tuning=tuning(o, defaults),
    )


def tuning(o: Overrides, defaults: dict[str, Any] | None = None) -> Tuning:
    """The scheduler's settings: a flag, then the bundle's recipe default, then tuning.py's."""
    base, defaults = Tuning(), defaults or {}
    speculate = defaults.get("speculate")
    if speculate is not None and not isinstance(speculate, bool):
        raise UsageError(
            f"The bundle's serving default 'speculate' is {speculate!r}; it must be true or false.",
            "Fix its recipe and pack the bundle again.",
        )
    recipe_step, recipe_draft = defaults.get("max_step_ms"), defaults.get("draft_max")
    return Tuning(
        max_step_ms=o.max_step_ms or (float(recipe_step) if recipe_step is not None else base.max_step_ms),
        speculate=o.speculate if o.speculate is not None else (speculate if speculate is not None else base.speculate),
        draft_max=o.draft_max
        if o.draft_max is not None
        else (int(recipe_draft) if recipe_draft is not None else base.draft_max),
    )


def gpu_settings(o: Overrides, defaults: dict[str, Any]) -> GpuSettings:
    """The GPU/KV-cache settings (flag, then recipe default, then llama.cpp's), checked before any load.

    Refuses (UsageError, exit 2) a bad value, a quantized V cache without flash attention, and
    offload this build or machine cannot do; the devices are only asked when offload is asked for.
    """

    def pick(value: Any, key: str, fallback: Any) -> Any:
        if value is not None:
            return value
        chosen = defaults.get(key)
        return chosen if chosen is not None else fallback

    split = pick(o.tensor_split, "tensor_split", None)
    settings = normalise(
        GpuSettings(
            gpu_layers=pick(o.gpu_layers, "gpu_layers", 0),
            flash_attn=str(pick(o.flash_attn, "flash_attn", "auto")),
            cache_type_k=str(pick(o.cache_type_k, "cache_type_k", "f16")),
            cache_type_v=str(pick(o.cache_type_v, "cache_type_v", "f16")),
            split_mode=pick(o.split_mode, "split_mode", None),
            tensor_split=tuple(float(x) for x in split) if split is not None else None,
            main_gpu=pick(o.main_gpu, "main_gpu", None),
        )
    )
    if not settings.wants_offload():
        return settings
    from mlserve.engine.llama.backends import backend_devices

    build = build_info()
    _, devices = backend_devices()
    gpus = sum(d.kind in ("gpu", "igpu") for d in devices)
    flags = GpuSettings(o.gpu_layers or 0, split_mode=o.split_mode, tensor_split=o.tensor_split, main_gpu=o.main_gpu)
    if not (build.gpu_offload and gpus) and not normalise(flags).wants_offload():
        # Only the recipe asks for offload: its GPU defaults are for GPU machines, so a CPU-only
        # host runs the bundle on the CPU (logged) instead of refusing a bundle it can serve.
        asked = " ".join(settings.wants_offload())
        _log.warning("The recipe's GPU defaults (%s) need a GPU backend and device; running on the CPU.", asked)
        return replace(settings, gpu_layers=0, split_mode=None, tensor_split=None, main_gpu=None)
    check_devices(settings, build.gpu_offload, gpus)
    return settings


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
