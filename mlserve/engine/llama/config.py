"""How to run one llama.cpp model (``EngineConfig``) and how to open it (``load_model``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlserve.engine.llama.gpu import GpuSettings
from mlserve.engine.llama.model import LlamaModel, LoadParams
from mlserve.engine.tuning import Tuning


@dataclass(frozen=True)
class EngineConfig:
    """How to run one model."""

    model_path: Path
    model_id: str
    ctx_size: int = 4096
    parallel: int = 8
    threads: int | None = None
    gpu_layers: int | str = 0  # N, "all" (-1) or "auto"
    max_queue: int = 64
    batch: int = 512
    kv_unified: bool = False
    chat_template: str | None = None
    stop: tuple[str, ...] = ()
    # llama-server's behaviour: control-token text inside message content becomes real control
    # tokens. Off by default, so a user cannot close their turn and speak as the model.
    parse_special_content: bool = False
    # serve --embeddings: a second, mean-pooling context on the same weights answers embed();
    # embeddings_ctx bounds one input and one embeddings decode (see embed_context.py).
    embeddings: bool = False
    embeddings_ctx: int = 512
    # The batching scheduler: step-time target while streams run, prompt-lookup speculation (tuning.py).
    tuning: Tuning = Tuning()
    # serve's GPU/KV-cache flags, checked by factory.engine_config before anything loads; the layer
    # count above wins over gpu.gpu_layers, so an EngineConfig built by hand keeps its meaning.
    gpu: GpuSettings = GpuSettings()


def default_threads() -> int:
    """Physical-ish core count: all available CPUs, at least one."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def load_model(config: EngineConfig) -> LlamaModel:
    """Validate the GGUF and load it with ``parallel`` sequences of ``ctx_size`` cells (blocking)."""
    n_gpu_layers, params = load_params(config)
    return LlamaModel(
        config.model_path,
        n_ctx_seq=config.ctx_size,
        n_seq=config.parallel,
        n_threads=config.threads or default_threads(),
        n_gpu_layers=n_gpu_layers,
        n_batch=config.batch,
        kv_unified=config.kv_unified,
        load=params,
    )


def load_params(config: EngineConfig) -> tuple[int, LoadParams]:
    """llama.cpp's n_gpu_layers and load parameters for ``config`` (``auto`` sized to the first GPU's free memory)."""
    from mlserve.deploy.memory import kv_shape
    from mlserve.engine.llama.backends import backend_devices
    from mlserve.engine.llama.gpu import CACHE_TYPES, FLASH_ATTN, SPLIT_MODES
    from mlserve.engine.llama.hardware import auto_layers, kv_cache_bytes

    gpu = config.gpu
    layers = config.gpu_layers
    if layers == "auto":
        _, devices = backend_devices()
        gpus = [d for d in devices if d.kind in ("gpu", "igpu")]
        shape = kv_shape(config.model_path)
        if not gpus or shape is None:
            layers = 0 if not gpus else "all"
        else:
            main = gpus[gpu.main_gpu or 0] if (gpu.main_gpu or 0) < len(gpus) else gpus[0]
            weights = config.model_path.stat().st_size
            cells = config.ctx_size * config.parallel
            kv = kv_cache_bytes(config.model_path, cells, gpu.cache_type_k, gpu.cache_type_v) or 0
            free = sum(d.free for d in gpus) if gpu.split_mode not in (None, "none") else main.free
            layers = auto_layers(shape.n_layer, weights, kv, free)
    n_gpu_layers = -1 if layers == "all" else int(layers)
    params = LoadParams(
        split_mode=SPLIT_MODES[gpu.split_mode or "layer"],
        main_gpu=gpu.main_gpu or 0,
        tensor_split=gpu.tensor_split or (),
        flash_attn=FLASH_ATTN[gpu.flash_attn],
        type_k=CACHE_TYPES[gpu.cache_type_k][0],
        type_v=CACHE_TYPES[gpu.cache_type_v][0],
    )
    return n_gpu_layers, params
