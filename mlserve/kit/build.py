"""``kit build``: wheels for mlserve and every runtime dependency, bundles, recipes, sums, manifest, install.sh.

Built on a machine with internet and the same Python version and OS as the target (the wheels
are that interpreter's); the CPU may differ: the llama-cpp-python wheel is built for a named
baseline, portable by default. The tar is written beside its destination and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlserve import __version__, config
from mlserve.bundles.packing import now_utc
from mlserve.bundles.store import Store
from mlserve.bundles.transfer import export_bundle
from mlserve.errors import SourceError, UsageError
from mlserve.fsutil import fsync_dir
from mlserve.kit.baseline import LLAMA, Baseline, find_or_build, sha256_file
from mlserve.kit.script import INSTALL_SH
from mlserve.kit.verify import MANIFEST, ROOT, SUMS

Progress = Callable[[str], None]


def checkout() -> Path | None:
    """The source tree this mlserve runs from (an editable install or a checkout), if any."""
    root = Path(__file__).resolve().parent.parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "mlserve").is_dir() else None


def _pip(args: list[str], what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
        raise SourceError(f"pip could not {what}: {tail}", "Check the network and pip's index settings, then retry.")


def _mlserve_wheel(out: Path, given: Path | None) -> Path:
    if given is not None:
        shutil.copy2(given, out / given.name)
        return out / given.name
    src = checkout()
    if src is None:
        raise UsageError("This mlserve is not a checkout, so its wheel cannot be built here.", "Pass --mlserve-wheel.")
    # setuptools at hand (the test extra has it): build without fetching the build requirements.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    _pip(["wheel", "--no-deps", "-q", *isolation, "-w", str(out), str(src)], "build the mlserve wheel")
    (wheel,) = out.glob("mlserve-*.whl")
    return wheel


def wheels(out: Path, llama: Path, mlserve_wheel: Path | None, progress: Progress) -> list[Path]:
    """Every wheel ``pip install mlserve`` needs on this Python and platform, into ``out``."""
    progress("building the mlserve wheel")
    own = _mlserve_wheel(out, mlserve_wheel)
    links = out.parent / "llama-link"
    links.mkdir(exist_ok=True)
    shutil.copy2(llama, links / llama.name)
    progress("collecting the runtime dependencies (pip wheel)")
    # --find-links + --prefer-binary: pip takes the chosen llama-cpp-python wheel, never the sdist.
    _pip(
        ["wheel", "-q", "--prefer-binary", "--find-links", str(links), "-w", str(out), str(own)],
        "collect the dependencies",
    )
    shutil.copy2(llama, out / llama.name)  # exactly the chosen build, whatever pip found
    shutil.rmtree(links)
    return sorted(out.glob("*.whl"))


def llama_version() -> str:
    """The installed llama-cpp-python's version: the kit carries the same one."""
    try:
        return importlib.metadata.version(LLAMA)
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(f"{LLAMA} is not installed here, so the kit cannot name its version.") from None


def target() -> dict[str, Any]:
    """This interpreter and platform: what the kit's wheels are for."""
    libc, libc_version = platform.libc_ver()
    return {
        "python": {
            "version": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "implementation": sys.implementation.name,
        },
        "platform": {"system": platform.system(), "machine": platform.machine(), "libc": libc, "glibc": libc_version},
    }


@dataclass(frozen=True)
class BuildResult:
    """What ``kit build`` made."""

    path: Path
    size: int
    digest: str
    manifest: dict[str, Any]


def _add(
    tar: tarfile.TarFile, rel: str, data: bytes | None = None, path: Path | None = None, mode: int = 0o644
) -> None:
    info = tarfile.TarInfo(f"{ROOT}/{rel}")
    info.mode, info.mtime = mode, 0
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        assert path is not None
        info.size = path.stat().st_size
        with open(path, "rb") as fh:
            tar.addfile(info, fh)


def build(
    refs: list[str],
    out: Path,
    want: Baseline,
    llama_wheel: Path | None = None,
    mlserve_wheel: Path | None = None,
    allow_build: bool = True,
    progress: Progress = lambda _: None,
) -> BuildResult:
    """Make the kit at ``out`` (atomically) with ``refs`` exported from the store."""
    store = Store()
    bundles = [store.resolve(ref) for ref in refs]
    progress(f"finding a llama-cpp-python {llama_version()} wheel for the {want.name} baseline")
    llama = find_or_build(want, llama_version(), llama_wheel, allow_build)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.build-") as tmp:
        work = Path(tmp)
        (work / "wheels").mkdir()
        found = wheels(work / "wheels", llama.path, mlserve_wheel, progress)
        (work / "bundles").mkdir()
        exported = []
        for b in bundles:
            progress(f"exporting {b.ref}")
            name = f"{b.name}-{b.version}.tar"
            export_bundle(store, b, work / "bundles" / name)
            exported.append({"ref": b.ref, "file": f"bundles/{name}", "digest": b.digest})
        recipes = sorted(config.recipes_dir().glob("*.yaml"))
        manifest = {
            "schema": 1,
            "created_at": now_utc(),
            "mlserve_version": __version__,
            **target(),
            "cpu_baseline": {"name": want.name, "description": want.description, "needs": want.cpu_needs()},
            "llama_cpp": {"version": llama_version(), **llama.record(want)},
            "wheels": [w.name for w in found],
            "bundles": exported,
            "recipes": [r.name for r in recipes],
        }
        files: dict[str, Path | bytes] = {f"wheels/{w.name}": w for w in found}
        files.update({e["file"]: work / e["file"] for e in exported})
        files.update({f"recipes/{r.name}": r for r in recipes})
        files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
        files["install.sh"] = INSTALL_SH.encode()
        sums = "".join(
            f"{hashlib.sha256(v).hexdigest() if isinstance(v, bytes) else sha256_file(v)}  {k}\n"
            for k, v in sorted(files.items())
        )
        progress(f"writing {out}")
        part = work / "kit.tar"
        with tarfile.open(part, "w", format=tarfile.GNU_FORMAT) as tar:
            _add(tar, SUMS, data=sums.encode(), mode=0o644)
            for rel, value in sorted(files.items()):
                mode = 0o755 if rel == "install.sh" else 0o644
                if isinstance(value, bytes):
                    _add(tar, rel, data=value, mode=mode)
                else:
                    _add(tar, rel, path=value, mode=mode)
        with open(part, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(part, out)
        fsync_dir(out.parent)
    with contextlib.suppress(OSError):
        out.chmod(0o644)
    digest = hashlib.sha256(sums.encode()).hexdigest()
    return BuildResult(out, out.stat().st_size, digest, manifest)


__all__ = ["LLAMA", "BuildResult", "build", "checkout", "target", "wheels"]
