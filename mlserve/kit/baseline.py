"""CPU baselines for the kit's llama-cpp-python wheel: what each is built with, and finding a built one.

A wheel's build flags are read back from the ``lib/cmake/ggml/ggml-config.cmake`` it carries
(ggml records every ``GGML_*`` option there), so a wheel in pip's cache is reused exactly when
it was built for the baseline asked for, whoever built it, and the kit manifest records them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlserve.bench import sysinfo
from mlserve.errors import SourceError, UsageError
from mlserve.fsutil import CHUNK
from mlserve.kit.cpu import PORTABLE_CMAKE, SYSTEM_INFO_FLAGS

GGML_CONFIG = "lib/cmake/ggml/ggml-config.cmake"
LLAMA = "llama-cpp-python"
BUILD_HINT = "It takes 10 to 30 minutes on 2 cores and needs a C++ compiler and cmake; or pass --llama-wheel FILE."


@dataclass(frozen=True)
class Baseline:
    """A named CPU target: the CMake flags it is built with and the ggml options a built wheel must show."""

    name: str
    description: str
    cmake_args: str
    expect: dict[str, str]  # GGML_* option -> "ON"/"OFF" in the wheel's ggml-config.cmake
    needs: tuple[str, ...] | None  # /proc/cpuinfo flags the target CPU needs; None: the build host's

    def cpu_needs(self) -> list[str]:
        """The CPU features a machine needs to run this build (/proc/cpuinfo names)."""
        if self.needs is not None:
            return list(self.needs)
        host = sysinfo.cpu_flags()  # -march=native: whatever the build host has that ggml uses
        return sorted({flag for flag in SYSTEM_INFO_FLAGS.values() if flag in host})


BASELINES = {
    "portable": Baseline(
        "portable",
        "GGML_NATIVE=OFF, every CPU variant built, the best one picked at run time (runs on any x86-64)",
        f"-DLLAVA_BUILD=OFF {PORTABLE_CMAKE}",
        {"GGML_NATIVE": "OFF", "GGML_BACKEND_DL": "ON", "GGML_CPU_ALL_VARIANTS": "ON", "GGML_CUDA": "OFF"},
        (),
    ),
    "native": Baseline(
        "native",
        "-march=native of the build machine: fastest there, needs every CPU feature it has",
        "-DLLAVA_BUILD=OFF",
        {"GGML_NATIVE": "ON", "GGML_BACKEND_DL": "OFF", "GGML_CUDA": "OFF"},
        None,
    ),
    "x86-64-v3": Baseline(
        "x86-64-v3",
        "Haswell and newer (AVX2, FMA, F16C, BMI2), no runtime dispatch",
        "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON",
        {"GGML_NATIVE": "OFF", "GGML_BACKEND_DL": "OFF", "GGML_AVX2": "ON", "GGML_FMA": "ON", "GGML_CUDA": "OFF"},
        ("avx", "avx2", "fma", "f16c", "bmi2"),
    ),
}


def baseline(name: str) -> Baseline:
    """The baseline called ``name``, or a usage error listing them."""
    if name not in BASELINES:
        raise UsageError(f"Unknown CPU baseline {name!r}.", f"Choose one of: {', '.join(BASELINES)}.")
    return BASELINES[name]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def ggml_options(wheel: Path) -> dict[str, str] | None:
    """The ``GGML_*`` options a llama-cpp-python wheel was built with; None when it does not record them."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            text = zf.read(GGML_CONFIG).decode(errors="replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return None
    return dict(re.findall(r'^set\((GGML_[A-Z0-9_]+) "([^"]*)"\)', text, re.MULTILINE))


def matches(wheel: Path, want: Baseline) -> bool:
    """Whether ``wheel`` was built for ``want`` (and, for portable, carries its CPU variants beside libllama)."""
    options = ggml_options(wheel)
    if options is None or any(options.get(k) != v for k, v in want.expect.items()):
        return False
    if want.expect.get("GGML_CPU_ALL_VARIANTS") == "ON":
        with zipfile.ZipFile(wheel) as zf:
            return any(re.fullmatch(r"llama_cpp/lib/libggml-cpu-[\w.]+\.so", n) for n in zf.namelist())
    return True


def _pip_cached(version: str) -> list[Path]:
    """llama-cpp-python wheels of ``version`` in pip's cache of built wheels."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "list", "llama_cpp_python", "--format=abspath"],
        capture_output=True,
        text=True,
        check=False,
    )
    found = [Path(line.strip()) for line in proc.stdout.splitlines() if line.strip().endswith(".whl")]
    return [p for p in found if p.name.startswith(f"llama_cpp_python-{version}-")]


def kit_cache() -> Path:
    """Where kit builds keep the wheels they compiled: ``$MLSERVE_KIT_CACHE``, else ~/.cache/mlserve/kit-wheels."""
    env = os.environ.get("MLSERVE_KIT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlserve" / "kit-wheels"


@dataclass(frozen=True)
class LlamaWheel:
    """The chosen llama-cpp-python wheel and where it came from."""

    path: Path
    source: str  # "file", "pip-cache", "kit-cache" or "built"
    options: dict[str, str]

    def record(self, want: Baseline) -> dict[str, Any]:
        """What the kit manifest says about it."""
        keys = ("GGML_NATIVE", "GGML_BACKEND_DL", "GGML_CPU_ALL_VARIANTS", "GGML_CUDA", "GGML_AVX", "GGML_AVX2")
        return {
            "wheel": self.path.name,
            "sha256": sha256_file(self.path),
            "source": self.source,
            "cmake_args": want.cmake_args if self.source == "built" else None,
            "ggml": {k: self.options.get(k) for k in (*keys, "GGML_FMA", "GGML_F16C", "GGML_BMI2", "GGML_AVX512")},
        }


def find_or_build(want: Baseline, version: str, explicit: Path | None, build: bool) -> LlamaWheel:
    """A wheel for ``want``: the one given, else pip's or our cache's, else built now (when ``build``)."""
    if explicit is not None:
        if not matches(explicit, want):
            raise UsageError(
                f"{explicit} was not built for the {want.name} baseline (its ggml options: "
                f"{json.dumps(ggml_options(explicit))}).",
                f'Build it with CMAKE_ARGS="{want.cmake_args}", or pick another --baseline.',
            )
        return LlamaWheel(explicit, "file", ggml_options(explicit) or {})
    for source, candidates in (("kit-cache", sorted((kit_cache() / want.name).glob("*.whl"))), ("pip-cache", [])):
        if source == "pip-cache":
            candidates = _pip_cached(version)
        for wheel in candidates:
            if wheel.name.startswith(f"llama_cpp_python-{version}-") and matches(wheel, want):
                return LlamaWheel(wheel, source, ggml_options(wheel) or {})
    if not build:
        raise SourceError(
            f"No llama-cpp-python {version} wheel built for the {want.name} baseline is cached here.",
            f"Drop --no-build to build one now. {BUILD_HINT}",
        )
    return LlamaWheel(_build(want, version), "built", {})


def _build(want: Baseline, version: str) -> Path:
    """Compile llama-cpp-python for ``want`` into the kit cache (minutes; progress on stderr)."""
    target = kit_cache() / want.name
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        env = {**os.environ, "CMAKE_ARGS": want.cmake_args}
        # --no-cache-dir: pip would file this build under the sdist's URL, beside (and in place of)
        # a native build, and a later `pip install` on this machine would pick it up.
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", tmp, f"{LLAMA}=={version}"]
        proc = subprocess.run(cmd, env=env, check=False, stdout=sys.stderr)
        built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
        if proc.returncode != 0 or not built:
            raise SourceError(f"Building {LLAMA} {version} for the {want.name} baseline failed.", BUILD_HINT)
        final = target / built[0].name
        shutil.move(str(built[0]), final)
    if not matches(final, want):
        raise SourceError(f"The {want.name} build of {LLAMA} does not show the expected ggml options.")
    return final
