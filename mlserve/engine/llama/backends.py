"""llama.cpp's process-wide side: backend initialisation, the build's abilities, ggml's backends and devices.

Also an owner of ``llama_cpp`` (beside model.py): a portable build (GGML_BACKEND_DL) registers
no backend until its CPU variants are loaded from the package's lib/, and doctor, the GPU checks
and every model load need the same initialisation first.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as ll

_init_lock = threading.Lock()
_initialised = False
LIB_DIR = Path(ll.__file__).parent / "lib"  # llama-cpp-python's shared libraries (and a portable build's CPU variants)


@ll.llama_log_callback  # type: ignore[untyped-decorator]
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Drop llama.cpp's own log lines; they can echo prompt pieces at debug level."""


def backend_init() -> None:
    global _initialised
    with _init_lock:
        if not _initialised:
            if os.environ.get("MLSERVE_LLAMA_LOG", "") in ("", "0"):
                ll.llama_log_set(_quiet_log, ctypes.c_void_p(0))
            _load_dynamic_backends()
            ll.llama_backend_init()
            _initialised = True


@functools.cache
def _ggml() -> Any:
    """The ggml library libllama itself uses, with the backend-registry calls typed.

    The wheel holds libggml.so, .so.0 and .so.0.x as three copies (zip has no symlinks), each
    with its own backend registry; libllama links the soname, so that copy is the one to ask.
    """
    soname = LIB_DIR / "libggml.so.0"
    if soname.exists():
        lib = ctypes.CDLL(str(soname))  # already mapped by libllama: the same handle comes back
    else:
        from llama_cpp._ggml import libggml as lib

    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for name, res, args in (
        ("ggml_backend_reg_count", sz, []),
        ("ggml_backend_reg_get", vp, [sz]),
        ("ggml_backend_reg_name", ctypes.c_char_p, [vp]),
        ("ggml_backend_dev_count", sz, []),
        ("ggml_backend_dev_get", vp, [sz]),
        ("ggml_backend_dev_name", ctypes.c_char_p, [vp]),
        ("ggml_backend_dev_description", ctypes.c_char_p, [vp]),
        ("ggml_backend_dev_type", ctypes.c_int, [vp]),
        ("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
        ("ggml_backend_load_all_from_path", None, [ctypes.c_char_p]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _load_dynamic_backends() -> None:
    """A GGML_BACKEND_DL build (the portable kit wheel) registers no backend until one is loaded.

    llama.cpp looks for ``libggml-cpu-*.so`` beside the executable (python's bin) and in the
    working directory, not beside libllama; load them from the package's lib/ so runtime CPU
    dispatch picks the best variant this CPU runs. A regular build has its backends linked in.
    """
    lib = _ggml()
    if lib.ggml_backend_reg_count() == 0:
        lib.ggml_backend_load_all_from_path(str(LIB_DIR).encode())


@dataclass(frozen=True)
class BuildInfo:
    """What this llama.cpp build can do."""

    system_info: str
    gpu_offload: bool
    max_devices: int
    version: str  # llama-cpp-python's version, which pins the llama.cpp it vendors


def build_info() -> BuildInfo:
    """llama.cpp's system info and whether GPU offload is compiled in."""
    backend_init()
    return BuildInfo(
        system_info=ll.llama_print_system_info().decode(errors="replace").strip(),
        gpu_offload=bool(ll.llama_supports_gpu_offload()),
        max_devices=int(ll.llama_max_devices()),
        version=str(getattr(ll, "__version__", "unknown")),
    )


@dataclass(frozen=True)
class Device:
    """One device a ggml backend offers: kind is cpu, gpu, igpu, accel or meta; memory in bytes."""

    name: str
    description: str
    kind: str
    free: int
    total: int


_DEVICE_KINDS = ("cpu", "gpu", "igpu", "accel", "meta")


def backend_devices() -> tuple[tuple[str, ...], tuple[Device, ...]]:
    """The registered ggml backends (e.g. CPU, CUDA) and their devices with free/total memory."""
    backend_init()
    lib = _ggml()
    regs = tuple(
        (lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)) or b"?").decode()
        for i in range(lib.ggml_backend_reg_count())
    )
    devices = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind = int(lib.ggml_backend_dev_type(dev))
        devices.append(
            Device(
                name=(lib.ggml_backend_dev_name(dev) or b"?").decode(errors="replace"),
                description=(lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                kind=_DEVICE_KINDS[kind] if 0 <= kind < len(_DEVICE_KINDS) else str(kind),
                free=int(free.value),
                total=int(total.value),
            )
        )
    return regs, tuple(devices)
