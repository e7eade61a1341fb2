"""What the installed llama.cpp build can do on this machine: backend, devices, CPU features, memory fit.

A llama.cpp built with ``-march=native`` on a newer CPU dies with SIGILL (illegal instruction)
the moment it is loaded on an older one, so ``probe()`` asks a child process: a crash there
becomes a finding with its fix instead of a dead server. ``python -m
mlserve.engine.llama.hardware`` is that child: it prints ``facts()`` as JSON.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlserve.bench import sysinfo
from mlserve.kit.cpu import SYSTEM_INFO_FLAGS

PROBE_TIMEOUT = 60.0


@dataclass(frozen=True)
class Facts:
    """The build's backend, devices and compiled-in CPU features, as seen by a process that loaded it."""

    version: str
    system_info: str
    gpu_offload: bool
    backends: tuple[str, ...]
    devices: tuple[dict[str, Any], ...]
    compiled: dict[str, bool]  # system_info's features: compiled in or not
    dispatch: bool  # GGML_BACKEND_DL build: the best CPU variant is chosen at run time

    @property
    def backend(self) -> str:
        """``CPU only``, or the GPU backends (e.g. ``CUDA``)."""
        gpus = [b for b in self.backends if b.upper() not in ("CPU", "BLAS", "RPC")]
        return "CPU only" if not self.gpu_offload or not gpus else " + ".join(gpus)

    def gpus(self) -> list[dict[str, Any]]:
        """The GPU devices (discrete and integrated)."""
        return [d for d in self.devices if d["kind"] in ("gpu", "igpu")]


def _compiled(system_info: str) -> dict[str, bool]:
    return {k.strip(): v == "1" for k, v in re.findall(r"([A-Z0-9_]+) = (\d)", system_info)}


def _dispatching_build(lib_dir: Path) -> bool:
    """Whether the build loads one of several CPU variants at run time (libggml-cpu-<variant>.so files)."""
    return any(lib_dir.glob("libggml-cpu-*.so")) or any(lib_dir.glob("ggml-cpu-*.dll"))


def facts() -> Facts:
    """Load llama.cpp in this process and describe it (may die with SIGILL on a too-new build)."""
    from mlserve.engine.llama.backends import LIB_DIR, backend_devices, build_info

    build = build_info()
    backends, devices = backend_devices()
    return Facts(
        version=build.version,
        system_info=build.system_info,
        gpu_offload=build.gpu_offload,
        backends=backends,
        devices=tuple(asdict(d) for d in devices),
        compiled=_compiled(build.system_info),
        dispatch=_dispatching_build(LIB_DIR),
    )


@dataclass(frozen=True)
class Probe:
    """``facts`` when the build loaded in a child process, else why not."""

    facts: Facts | None
    error: str | None = None
    illegal_instruction: bool = False


def probe(python: str | None = None) -> Probe:
    """Load the build in a child process (SIGILL there is reported, not suffered)."""
    cmd = [python or sys.executable, "-m", "mlserve.engine.llama.hardware"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Probe(None, f"the llama.cpp probe did not finish: {exc}")
    if proc.returncode == -signal.SIGILL:
        return Probe(None, "llama.cpp died with an illegal instruction: it was built for a newer CPU", True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Probe(None, f"llama.cpp cannot be loaded: {tail}")
    try:
        raw = json.loads(proc.stdout)
        raw["backends"] = tuple(raw["backends"])
        raw["devices"] = tuple(raw["devices"])
        return Probe(Facts(**raw))
    except (ValueError, TypeError, KeyError) as exc:
        return Probe(None, f"the llama.cpp probe printed something unexpected ({exc})")


def cpu_mismatch(found: Facts | None, host: set[str] | None = None) -> list[str]:
    """CPU features the build needs that this CPU lacks (/proc/cpuinfo names; empty when it fits)."""
    if found is None or found.dispatch:
        return []  # a dispatching build only loads a variant this CPU passes
    flags = sysinfo.cpu_flags() if host is None else host
    if not flags:
        return []  # no /proc/cpuinfo: nothing to compare against
    needed = [SYSTEM_INFO_FLAGS[k] for k, on in found.compiled.items() if on and k in SYSTEM_INFO_FLAGS]
    return [f for f in needed if f not in flags]


def needed_features(found: Facts) -> list[str]:
    """The CPU features the build cannot run without (/proc/cpuinfo names)."""
    if found.dispatch:
        return []
    return [SYSTEM_INFO_FLAGS[k] for k, on in found.compiled.items() if on and k in SYSTEM_INFO_FLAGS]


@dataclass(frozen=True)
class Fit:
    """Whether a model's weights and KV cache fit a device's free memory."""

    device: str
    weights: int
    kv_cache: int
    free: int

    @property
    def needed(self) -> int:
        """Weights plus KV cache, bytes."""
        return self.weights + self.kv_cache

    @property
    def fits(self) -> bool:
        """Whether the free memory holds both (compute buffers come on top; see RUNTIME_BYTES)."""
        return self.needed <= self.free


def kv_cache_bytes(model_path: Path, cells: int, type_k: str = "f16", type_v: str = "f16") -> int | None:
    """KV cache bytes for ``cells`` cells (ctx x parallel) of these cache types; None when the GGUF does not say."""
    from mlserve.deploy.memory import kv_shape
    from mlserve.engine.llama.gpu import cache_bytes

    shape = kv_shape(model_path)
    if shape is None:
        return None
    per_cell = shape.n_layer * (shape.n_embd_k_gqa * cache_bytes(type_k) + shape.n_embd_v_gqa * cache_bytes(type_v))
    return int(cells * per_cell)


def head_dims(model_path: Path) -> tuple[int, int] | None:
    """(key, value) elements per attention head from the GGUF's metadata; None when it does not say."""
    from mlserve.bundles import gguf_info
    from mlserve.errors import GGUFError

    try:
        meta = gguf_info.metadata(model_path)
    except GGUFError:
        return None
    arch = meta.get("general.architecture")
    embd, heads = meta.get(f"{arch}.embedding_length"), meta.get(f"{arch}.attention.head_count")
    fallback = embd // heads if isinstance(embd, int) and isinstance(heads, int) and heads > 0 else None
    key = meta.get(f"{arch}.attention.key_length", fallback)
    value = meta.get(f"{arch}.attention.value_length", fallback)
    return (key, value) if isinstance(key, int) and isinstance(value, int) else None


def auto_layers(n_layer: int, weights: int, kv: int, free: int) -> int | str:
    """``--gpu-layers auto``: every layer when weights + KV fit ``free`` bytes, else the share that does."""
    if weights + kv <= free:
        return "all"
    per_layer = (weights + kv) / max(1, n_layer)
    return max(0, min(n_layer, int(free // per_layer) if per_layer else 0))


def main() -> None:
    """Print ``facts()`` as JSON (the child side of ``probe()``)."""
    found = facts()
    print(json.dumps({**asdict(found), "backends": list(found.backends), "devices": list(found.devices)}))


if __name__ == "__main__":
    main()
