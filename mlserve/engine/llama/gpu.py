"""GPU offload and KV-cache settings: parsing, the checks made before a model loads, llama.cpp's values.

Every setting is checked up front, before llama.cpp opens the weights, so a wrong flag is an
exit-2 usage error naming it instead of a crash, a silent fallback to the CPU, or a failure
minutes later when the context is created:

- a quantized V cache needs flash attention (llama.cpp refuses the context otherwise);
- anything asking for offload (layers, split mode, tensor split, main GPU) needs a build
  with a GPU backend;
- a tensor split has one share per GPU device; the main GPU is one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlserve.errors import UsageError

# ggml_type ids llama.cpp accepts for the KV cache (llama-server's --cache-type-k/-v list) and
# the bytes one element takes (block size / elements per block for the quantized ones).
CACHE_TYPES: dict[str, tuple[int, float]] = {
    "f32": (0, 4.0),
    "f16": (1, 2.0),
    "bf16": (30, 2.0),
    "q8_0": (8, 34 / 32),
    "q4_0": (2, 18 / 32),
    "q4_1": (3, 20 / 32),
    "iq4_nl": (20, 18 / 32),
    "q5_0": (6, 22 / 32),
    "q5_1": (7, 24 / 32),
}
UNQUANTIZED = ("f32", "f16", "bf16")
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type
SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}  # llama_split_mode
ALL = "all"
AUTO = "auto"
CUDA_HINT = "Install a build with a GPU backend: `make install GPU=cuda` (see the README's GPU server section)."


@dataclass(frozen=True)
class GpuSettings:
    """Offload and KV-cache settings; None means "not asked for" (llama.cpp's default)."""

    gpu_layers: int | str = 0  # N layers, "all" or "auto"
    flash_attn: str = AUTO
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    split_mode: str | None = None
    tensor_split: tuple[float, ...] | None = None
    main_gpu: int | None = None

    def wants_offload(self) -> list[str]:
        """The settings that only make sense with a GPU, as flags (empty when none)."""
        asked = []
        if self.gpu_layers == ALL or (isinstance(self.gpu_layers, int) and self.gpu_layers > 0):
            asked.append(f"--gpu-layers {self.gpu_layers}")
        if self.split_mode not in (None, "none"):
            asked.append(f"--split-mode {self.split_mode}")
        if self.tensor_split is not None:
            asked.append("--tensor-split " + ",".join(f"{x:g}" for x in self.tensor_split))
        if self.main_gpu is not None:
            asked.append(f"--main-gpu {self.main_gpu}")
        return asked


def parse_gpu_layers(value: str | int) -> int | str:
    """``auto``, ``all`` (or -1, as before) or a layer count."""
    if isinstance(value, int):
        text = str(value)
    else:
        text = value.strip().lower()
    if text in (AUTO, ALL):
        return text
    try:
        number = int(text)
    except ValueError:
        raise UsageError(f"--gpu-layers must be auto, all or a number of layers, not {value!r}.") from None
    if number == -1:
        return ALL  # llama.cpp's "every layer", accepted since the first release of --gpu-layers
    if number < 0:
        raise UsageError(f"--gpu-layers must be auto, all or a number of layers >= 0, not {value!r}.")
    return number


def parse_tensor_split(value: str) -> tuple[float, ...]:
    """``3,1`` -> (3.0, 1.0): each GPU's share of the weights; at least one share must be positive."""
    parts = [p.strip() for p in value.split(",")]
    try:
        shares = tuple(float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--tensor-split must be numbers separated by commas (e.g. 3,1), not {value!r}.") from None
    if any(not (s >= 0 and s < float("inf")) for s in shares) or not any(s > 0 for s in shares):
        raise UsageError(f"--tensor-split shares must be >= 0 and not all 0, not {value!r}.")
    return shares


def _choice(flag: str, value: str, allowed: Sequence[str]) -> str:
    chosen = value.strip().lower()
    if chosen not in allowed:
        raise UsageError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}.")
    return chosen


def normalise(settings: GpuSettings) -> GpuSettings:
    """The settings with every value checked for its own range (no hardware needed)."""
    flash = _choice("--flash-attn", settings.flash_attn, tuple(FLASH_ATTN))
    type_k = _choice("--cache-type-k", settings.cache_type_k, tuple(CACHE_TYPES))
    type_v = _choice("--cache-type-v", settings.cache_type_v, tuple(CACHE_TYPES))
    split = None if settings.split_mode is None else _choice("--split-mode", settings.split_mode, tuple(SPLIT_MODES))
    if settings.main_gpu is not None and settings.main_gpu < 0:
        raise UsageError(f"--main-gpu must be a device index >= 0, not {settings.main_gpu}.")
    if type_v not in UNQUANTIZED and flash != "on":
        raise UsageError(
            f"A quantized V cache (--cache-type-v {type_v}) needs flash attention, and --flash-attn is {flash}.",
            "Add --flash-attn on, or keep the V cache at f16.",
        )
    return GpuSettings(
        gpu_layers=parse_gpu_layers(settings.gpu_layers),
        flash_attn=flash,
        cache_type_k=type_k,
        cache_type_v=type_v,
        split_mode=split,
        tensor_split=settings.tensor_split,
        main_gpu=settings.main_gpu,
    )


def check_devices(settings: GpuSettings, gpu_offload: bool, gpus: int) -> None:
    """Refuse offload settings this build and machine cannot honour (``gpus``: GPU devices found)."""
    asked = settings.wants_offload()
    if asked and not gpu_offload:
        raise UsageError(
            f"{' '.join(asked)} asks for GPU offload, but this llama.cpp build has no GPU backend (CPU only).",
            CUDA_HINT,
        )
    if asked and gpus == 0:
        raise UsageError(
            f"{' '.join(asked)} asks for GPU offload, but the GPU backend finds no device.",
            "Check `nvidia-smi` and CUDA_VISIBLE_DEVICES, then `mlserve doctor`.",
        )
    if settings.tensor_split is not None and len(settings.tensor_split) != gpus:
        raise UsageError(
            f"--tensor-split has {len(settings.tensor_split)} shares but this machine has {gpus} GPU(s).",
            "Give one share per GPU, in device order (see `mlserve doctor`).",
        )
    if settings.main_gpu is not None and settings.main_gpu >= gpus:
        raise UsageError(
            f"--main-gpu {settings.main_gpu} does not exist: this machine has {gpus} GPU(s), numbered from 0."
        )


QUANT_BLOCK = 32  # elements per block of every quantized KV type above


def check_head_dims(settings: GpuSettings, dims: tuple[int, int] | None) -> None:
    """Refuse a quantized K/V cache whose blocks do not divide the model's head size (llama.cpp would)."""
    if dims is None:
        return
    for flag, name, dim in (
        ("--cache-type-k", settings.cache_type_k, dims[0]),
        ("--cache-type-v", settings.cache_type_v, dims[1]),
    ):
        if name not in UNQUANTIZED and dim % QUANT_BLOCK:
            raise UsageError(
                f"{flag} {name} stores blocks of {QUANT_BLOCK} values, which do not divide this model's "
                f"attention head size of {dim}.",
                "Keep that cache at f16 for this model.",
            )


def cache_bytes(type_name: str) -> float:
    """Bytes one KV-cache element of this type takes."""
    return CACHE_TYPES[type_name][1]
