"""``kit install``: verify a kit, check it suits this machine, build the venv offline, import the bundles.

Order matters: every byte is verified into staging, then Python, platform, C library and CPU
are checked, all before anything is created. The venv is built beside its destination under a
temporary name (``pip install --no-index --find-links``: no network), the bundles are imported
with it, and only then is it renamed into place; any failure removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlserve.bench import sysinfo
from mlserve.errors import InvalidInputError, MlserveError, UsageError
from mlserve.kit.verify import Staged, staged

PROBE = (
    "import json, platform, sys; print(json.dumps({'version': '%d.%d' % sys.version_info[:2], "
    "'implementation': sys.implementation.name, 'system': platform.system(), 'machine': platform.machine(), "
    "'libc': platform.libc_ver()}))"
)
Progress = Callable[[str], None]


class KitMismatch(InvalidInputError):
    """The kit was built for another Python, platform, C library or CPU."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def _interpreter(python: str) -> dict[str, Any]:
    try:
        proc = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60)
        found: dict[str, Any] = json.loads(proc.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise UsageError(f"{python} cannot be run as a Python interpreter ({exc}).", "Pass --python PATH.") from exc
    return found


def check_target(manifest: dict[str, Any], python: str, cpu_flags: set[str] | None = None) -> dict[str, Any]:
    """Refuse a kit built for another Python, OS, machine, older C library or a CPU this one is not."""
    here = _interpreter(python)
    want_py = manifest["python"]
    if here["version"] != want_py["version"] or here["implementation"] != want_py["implementation"]:
        raise KitMismatch(
            f"This kit is for {want_py['implementation']} {want_py['version']}; {python} is "
            f"{here['implementation']} {here['version']}. Nothing was installed.",
            f"Pass --python /path/to/python{want_py['version']}, or build the kit with that Python.",
        )
    plat = manifest["platform"]
    if (here["system"], here["machine"]) != (plat["system"], plat["machine"]):
        raise KitMismatch(
            f"This kit is for {plat['system']} {plat['machine']}, not {here['system']} {here['machine']}. "
            "Nothing was installed.",
            "Build the kit on a machine of the target's OS and architecture.",
        )
    libc, libc_version = here["libc"]
    if plat.get("libc") == "glibc" and (libc != "glibc" or _version(libc_version) < _version(plat["glibc"])):
        raise KitMismatch(
            f"This kit's wheels need glibc {plat['glibc']} or newer; this machine has {libc or 'no glibc'} "
            f"{libc_version}. Nothing was installed.",
            "Build the kit on a machine whose glibc is no newer than the target's.",
        )
    flags = sysinfo.cpu_flags() if cpu_flags is None else cpu_flags
    missing = [f for f in manifest["cpu_baseline"]["needs"] if flags and f not in flags]
    if missing:
        raise KitMismatch(
            f"This kit's llama.cpp ({manifest['cpu_baseline']['name']} baseline) needs CPU features "
            f"{', '.join(missing)}, which this CPU lacks: it would die with an illegal instruction. "
            "Nothing was installed.",
            "Build the kit with `mlserve kit build --baseline portable`.",
        )
    return here


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise MlserveError(f"Could not {what}: {tail}", "Nothing was installed; the message above says why.")
    return proc.stdout


def _relocate(part: Path, final: Path) -> None:
    """Point the venv's scripts (shebangs, activate) at its final folder before it is moved there."""
    old, new = str(part).encode(), str(final).encode()
    for path in [*(part / "bin").iterdir(), part / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data:
            path.write_bytes(data.replace(old, new))


def _pip_env() -> dict[str, str]:
    # No user or site pip configuration (an extra index, a proxy) takes part: only the kit's wheels.
    return {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _build_venv(stage: Staged, part: Path, python: str, progress: Progress) -> list[dict[str, Any]]:
    manifest = stage.manifest
    progress(f"creating the venv with {python}")
    _run([python, "-m", "venv", str(part)], "create the venv")
    py = str(part / "bin" / "python")
    progress("installing the wheels (pip --no-index)")
    _run(
        [py, "-m", "pip", "install", "-q", "--no-index", "--no-cache-dir", "--only-binary", ":all:"]
        + ["--find-links", str(stage.path("wheels")), f"mlserve=={manifest['mlserve_version']}"],
        "install the kit's wheels",
        _pip_env(),
    )
    imported = []
    for entry in manifest["bundles"]:
        progress(f"importing {entry['ref']}")
        out = _run([py, "-m", "mlserve", "import", str(stage.path(entry["file"])), "--json"], f"import {entry['ref']}")
        imported.append(json.loads(out))
    return imported


def install(kit: Path, venv: Path, python: str | None = None, progress: Progress = lambda _: None) -> dict[str, Any]:
    """Install ``kit`` into a new venv at ``venv`` and import its bundles into ``$MLSERVE_HOME``."""
    started = time.monotonic()
    python = python or sys.executable
    venv = venv.absolute()
    if venv.exists() and (not venv.is_dir() or any(venv.iterdir())):
        raise UsageError(f"{venv} already exists and is not empty.", "Pick a new folder for the venv.")
    progress(f"verifying every file of {kit}")
    with staged(kit, venv) as stage:
        here = check_target(stage.manifest, python)
        part = Path(tempfile.mkdtemp(dir=venv.parent, prefix=f".{venv.name}.partial-"))
        part.chmod(0o755)  # mkdtemp's 0700 would keep other users (a service account) out of the venv
        try:
            imported = _build_venv(stage, part, python, progress)
            _relocate(part, venv)
            if venv.exists():
                venv.rmdir()  # empty, checked above
            os.rename(part, venv)
        except BaseException:
            shutil.rmtree(part, ignore_errors=True)
            raise
        manifest = stage.manifest
        return {
            "kit": str(kit),
            "digest": stage.digest,
            "venv": str(venv),
            "mlserve": str(venv / "bin" / "mlserve"),
            "python": here["version"],
            "cpu_baseline": manifest["cpu_baseline"]["name"],
            "llama_cpp": manifest["llama_cpp"],
            "wheels": len(manifest["wheels"]),
            "bundles": [{"name": b["name"], "version": b["version"], "digest": b["digest"]} for b in imported],
            "seconds": round(time.monotonic() - started, 1),
        }
