"""Check every byte of a kit and unpack it into a staging folder; nothing is used before all of it passes.

A kit is one (GNU) tar under ``mlserve-kit/``. Each member's bytes are hashed against
``SHA256SUMS`` while they are written to staging, each header is covered by tar's own
checksum, and the padding between members and after the last one must be zeros, so a single
altered byte anywhere in the file is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mlserve.errors import ArchiveError, IntegrityError
from mlserve.fsutil import CHUNK

ROOT = "mlserve-kit"
SUMS = "SHA256SUMS"
MANIFEST = "kit.json"
BLOCK = 512


def parse_sums(text: str) -> dict[str, str]:
    """``sha256sum`` output -> {relative path: hex}; refuses anything else."""
    sums: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        hexdigest, sep, name = line.partition("  ")
        if not sep or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest) or not name:
            raise ArchiveError(f"{SUMS} line {n} is not '<sha256>  <path>'.")
        sums[name] = hexdigest
    return sums


def _relative(member: tarfile.TarInfo) -> str | None:
    """The member's path under mlserve-kit/ (None for the folder itself); refuses anything unsafe."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or not path.parts or path.parts[0] != ROOT:
        raise ArchiveError(f"The kit holds {member.name!r}, outside {ROOT}/; refusing it.")
    if member.isdir():
        return None
    if not member.isreg():
        raise ArchiveError(f"The kit member {member.name} is not a regular file; refusing it.")
    return "/".join(path.parts[1:])


def _zero_gap(fh: Any, start: int, end: int, where: str) -> None:
    fh.seek(start)
    left = end - start
    while left > 0:
        chunk = fh.read(min(CHUNK, left))
        if not chunk:
            break
        if chunk.count(0) != len(chunk):
            raise IntegrityError(f"The kit has altered bytes {where}.", "Copy the kit again from its source.")
        left -= len(chunk)


def _check_long_name(fh: Any, member: tarfile.TarInfo) -> None:
    """A GNU long name is stored as its own block(s) before the header: exactly the name, then zeros."""
    start, stop = member.offset + BLOCK, member.offset_data - BLOCK
    if stop <= start:
        return  # a plain header: tar's checksum covers it
    fh.seek(start)
    data = fh.read(stop - start)
    name = member.name.encode() + b"\0"
    if not data.startswith(name) or data[len(name) :].count(0) != len(data) - len(name):
        raise IntegrityError(f"The kit has altered bytes in the name of {member.name}.", "Copy the kit again.")


@dataclass(frozen=True)
class Staged:
    """A verified, unpacked kit: its folder (delete it when done), manifest and checksum digest."""

    folder: Path
    manifest: dict[str, Any]
    digest: str  # sha256 of SHA256SUMS: one value to compare with the one `kit build` printed

    def path(self, relative: str) -> Path:
        """A file of the kit."""
        return self.folder / relative


def unpack(kit: Path, near: Path) -> Staged:
    """Verify ``kit`` into a new staging folder beside ``near``; on any failure nothing is left behind."""
    near.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=near.parent, prefix=f".{near.name}.kit-"))
    try:
        return _unpack(kit, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _unpack(kit: Path, folder: Path) -> Staged:
    hashes: dict[str, str] = {}
    try:
        with open(kit, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            end = 0
            for member in tar:
                _zero_gap(raw, end, member.offset, "between members")
                _check_long_name(raw, member)
                rel = _relative(member)
                end = member.offset_data + -(-member.size // BLOCK) * BLOCK
                if rel is None:
                    continue
                if rel in hashes:
                    raise ArchiveError(f"The kit holds {rel} twice; refusing it.")
                target = folder / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                with source, open(target, "wb") as out:
                    while chunk := source.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                _zero_gap(raw, member.offset_data + member.size, end, f"in the padding of {rel}")
                hashes[rel] = digest.hexdigest()
                raw.seek(end)
            raw.seek(0, 2)
            _zero_gap(raw, end, raw.tell(), "after the last member")
    except tarfile.TarError as exc:
        raise IntegrityError(f"{kit} is not an intact kit ({exc}).", "Copy the kit again from its source.") from exc
    if SUMS not in hashes:
        raise ArchiveError(f"{kit} has no {SUMS}; it is not an mlserve kit.")
    sums_text = (folder / SUMS).read_text(encoding="utf-8", errors="replace")
    listed = parse_sums(sums_text)
    present = {k: v for k, v in hashes.items() if k != SUMS}
    for rel, want in listed.items():
        if rel not in present:
            raise IntegrityError(f"The kit lacks {rel}, which {SUMS} lists.", "Copy the kit again from its source.")
        if present[rel] != want:
            raise IntegrityError(
                f"{rel} in the kit does not match its sha256 in {SUMS}; the kit is damaged or altered.",
                "Copy the kit again from its source, and compare its digest with the one `kit build` printed.",
            )
    extra = sorted(set(present) - set(listed))
    if extra:
        raise IntegrityError(f"The kit holds {extra[0]}, which {SUMS} does not list; refusing it.")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"The kit's {MANIFEST} cannot be read ({exc}).") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != 1:
        raise ArchiveError(f"The kit's {MANIFEST} is not a schema-1 mlserve kit manifest.")
    return Staged(folder, manifest, hashlib.sha256(sums_text.encode()).hexdigest())


@contextlib.contextmanager
def staged(kit: Path, near: Path) -> Any:
    """``unpack`` as a context manager that removes the staging folder afterwards."""
    stage = unpack(kit, near)
    try:
        yield stage
    finally:
        shutil.rmtree(stage.folder, ignore_errors=True)
