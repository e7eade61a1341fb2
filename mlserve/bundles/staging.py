"""The store's staging area: temp files whose writers hold an flock, and the sweep that reaps dead writers' files.

A staged blob lives in ``tmp/`` from staging until its commit, minutes for a large model,
outside the store lock. Its writer holds a shared ``flock`` on the file for all that time, and
the sweep (run under the store lock) deletes a file only when it can take the exclusive lock
itself. The kernel drops a dead process's flocks, so "unlocked" means "no live writer",
whichever PID namespace (container) the writer runs in: ``MLSERVE_HOME`` may be a volume
shared by containers, where a pid in a file name names nobody, or somebody else.

Files this module did not make are judged conservatively:

- ``.write-*`` files come from ``fsutil.atomic_write_bytes``, whose every caller here
  (store.py and security/keys.py) holds the store lock; the sweep holds it too, so they are stale.
- anything else (a ``.KIND-PID-`` file from an older mlserve, an unknown name) whose owner
  cannot be checked is removed only when unchanged for ``GRACE_S`` and its pid is not alive here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

GRACE_S = 3600.0
LOCKED_RE = re.compile(r"\.\w+-lk-")  # this module's files: the flock says whether the writer lives
LEGACY_RE = re.compile(r"\.\w+-(\d+)-")  # pid-tagged temp files of older versions
WRITE_PREFIX = ".write-"  # fsutil.atomic_write_bytes, always under the store lock
_TRIES = 100  # a new file is lost only to a concurrent sweep, so a few tries always do
_LOCKED = -1


class _Held:
    """The flocks this process holds on its staged files, by path."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._mutex = threading.Lock()

    def hold(self, path: Path, fd: int | None = None) -> bool:
        """Take a shared flock on ``path``; False when the file vanished before the lock was held."""
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            pass  # a filesystem without flock: the sweep cannot probe it either and waits out GRACE_S
        # A sweep may have reaped the file between its creation and our lock: then the name is gone.
        if not _same_file(path, fd):
            os.close(fd)
            return False
        with self._mutex:
            old = self._fds.pop(_key(path), None)
            self._fds[_key(path)] = fd
        if old is not None:
            os.close(old)
        return True

    def owns(self, path: Path) -> bool:
        """Whether this process holds ``path`` (a POSIX-lock emulation, as on NFS, cannot tell us)."""
        with self._mutex:
            return _key(path) in self._fds

    def release(self, path: Path) -> None:
        """Drop the lock on ``path`` (committed or deleted)."""
        with self._mutex:
            fd = self._fds.pop(_key(path), None)
        if fd is not None:
            os.close(fd)

    def sweep(self) -> None:
        """Drop locks on files that callers deleted or renamed without telling us."""
        with self._mutex:
            items = list(self._fds.items())
        for name, fd in items:
            if not _same_file(Path(name), fd):
                self.release(Path(name))


def _key(path: Path) -> str:
    return os.path.abspath(path)


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


HELD = _Held()


def new_temp(tmp: Path, kind: str) -> Path:
    """Create an empty file in ``tmp`` and hold its flock until ``HELD.release``."""
    HELD.sweep()
    tmp.mkdir(parents=True, exist_ok=True)
    for _ in range(_TRIES):
        fd, name = tempfile.mkstemp(dir=tmp, prefix=f".{kind}-lk-{os.getpid()}-")
        if HELD.hold(Path(name), fd):
            return Path(name)
    raise OSError(errno.EAGAIN, f"could not keep a staging file in {tmp}")


def link_temp(src: Path, tmp: Path, kind: str) -> Path | None:
    """Hard-link ``src`` into ``tmp`` under a held flock; None when they are on different filesystems."""
    HELD.sweep()
    tmp.mkdir(parents=True, exist_ok=True)
    for _ in range(_TRIES):
        path = tmp / f".{kind}-lk-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            os.link(src, path)
        except FileExistsError:
            continue
        except OSError:
            return None
        if HELD.hold(path):
            return path
    raise OSError(errno.EAGAIN, f"could not keep a staging file in {tmp}")


def _probe(path: Path) -> int | None:
    """An fd holding ``path``'s exclusive flock (no live writer), ``_LOCKED``, or None (cannot tell)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        return _LOCKED if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
    return fd


def _unchanged_for(path: Path, seconds: float, linked: bool) -> bool:
    try:
        st = path.stat(follow_symlinks=False)
    except OSError:
        return False
    # Our files may be hard links that keep the source's old mtime; linking bumped their ctime.
    # Older versions' files are judged by mtime alone (a writer's progress), which tests can set.
    changed = max(st.st_mtime, st.st_ctime) if linked else st.st_mtime
    return time.time() - changed > seconds


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def sweep(tmp: Path) -> None:
    """Delete what dead writers left in ``tmp`` (caller holds the store lock)."""
    if not tmp.is_dir():
        return
    HELD.sweep()
    for entry in tmp.iterdir():
        if HELD.owns(entry):
            continue
        if entry.name.startswith(WRITE_PREFIX):
            _remove(entry)
            continue
        lock = None if entry.is_dir() else _probe(entry)
        if lock == _LOCKED:
            continue  # a live writer, in whatever PID namespace
        try:
            ours = bool(LOCKED_RE.match(entry.name))
            if lock is not None and ours:
                _remove(entry)  # unlinked while we hold its lock, so no writer can take it meanwhile
            elif _unchanged_for(entry, GRACE_S, ours) and not _legacy_pid_alive(entry.name):
                _remove(entry)
        finally:
            if lock is not None:
                os.close(lock)


def _legacy_pid_alive(name: str) -> bool:
    """Whether an old pid-tagged file's writer may live here (a pid from another namespace may look dead)."""
    match = LEGACY_RE.match(name)
    if not match:
        return False
    pid = int(match.group(1))
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True
