"""Facts about this machine read from /proc and the OS: CPU model and features, cores, memory, disk."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path

from mlserve import __version__

CPU_FEATURES = ("sse3", "ssse3", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
ARM_FEATURES = ("asimd", "neon", "sve", "i8mm", "dotprod", "asimddp")


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip().lower(), value.strip())
    return info


def cpu_model() -> str:
    """The CPU's marketing name (or the platform's processor string)."""
    info = _cpuinfo()
    return info.get("model name") or info.get("hardware") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 "flags", Arm "Features")."""
    info = _cpuinfo()
    return set((info.get("flags") or info.get("features") or "").split())


def cpu_features() -> dict[str, bool]:
    """The features llama.cpp cares about, present or not."""
    flags = cpu_flags()
    names = ARM_FEATURES if platform.machine().lower() in ("aarch64", "arm64") else CPU_FEATURES
    found = {name: name in flags or (name == "sse3" and "pni" in flags) for name in names}
    if "neon" in found:
        found["neon"] = "neon" in flags or "asimd" in flags
    return found


def cores() -> dict[str, int]:
    """Logical CPUs and the ones this process may run on."""
    logical = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = logical
    return {"logical": logical, "usable": usable}


def memory() -> dict[str, int]:
    """Total and available RAM in bytes (0 when unknown)."""
    out = {"total": 0, "available": 0}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                out["total" if key == "MemTotal" else "available"] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def machine() -> dict[str, object]:
    """The environment block of a benchmark report (without the llama.cpp build, which the caller adds)."""
    return {
        "cpu": cpu_model(),
        "cores": cores(),
        "memory_bytes": memory()["total"],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "mlserve_version": __version__,
    }
