"""Helpers for store tests: snapshots of MLSERVE_HOME and blob tampering."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def snapshot(home: Path) -> dict[str, bytes]:
    """Every file that makes up the visible store (manifests, blobs, channels) with its bytes' identity."""
    state: dict[str, bytes] = {}
    for part in ("manifests", "blobs", "channels"):
        root = home / part
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if path.is_file():
                st = path.stat()
                state[str(path.relative_to(home))] = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()
    return state


def tmp_files(home: Path) -> list[str]:
    """What is left in the staging area."""
    tmp = home / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


def blobs(home: Path) -> list[Path]:
    """Every stored blob file."""
    folder = home / "blobs"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def manifests(home: Path) -> list[str]:
    """Every manifest file, as NAME/VERSION.json."""
    folder = home / "manifests"
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def flip_byte(path: Path, offset: int = -1) -> None:
    """Invert one byte of a (read-only) file in place."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        pos = fh.tell()
        byte = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(path, 0o444)


def assert_one_error(stderr: str) -> None:
    """stderr is a short plain error: no traceback, an 'error:' line, at most a hint after it."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), stderr
    assert len(lines) <= 2, stderr
    if len(lines) == 2:
        assert lines[1].startswith("hint: "), stderr
