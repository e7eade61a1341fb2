"""The hash-chained audit log: ``$MLSERVE_HOME/audit/YYYY-MM-DD.jsonl`` (dir 0700, files 0600).

Each line is one record in canonical JSON (sorted keys, no spaces) with ``prev`` (the
``hash`` of the record before it; 64 zeros for the very first) and ``hash`` (sha256 of
the record's canonical JSON without ``hash``). The chain runs across days and restarts:
a writer reads the newest record's hash before it appends.

Writers: every append takes an flock on ``audit/.lock``, so several processes (a server,
CLI commands, a second server on the same home) interleave whole records and keep one
chain; a writer re-reads the tail only when the file grew behind its back. The record's
time (and so its day file) is taken under that lock, together with the previous hash:
a time taken before it could put a record into yesterday's file after another writer
had started today's, and ``verify`` would see the chain out of order. Within a process a
threading lock serialises appends as well (threads sharing one descriptor share its
flock), so a server may append from worker threads. Records are
written with a single ``os.write`` on an O_APPEND descriptor kept open (so a record
reaches the kernel at once and survives a process crash). Per-request records are not
fsynced by default (an fsync costs milliseconds per request on most disks; a power loss
can lose the last few records, which ``verify`` sees only as a shorter chain); set
``MLSERVE_AUDIT_FSYNC=1`` to fsync each one. Administrative events (``append``) are
always fsynced. Removing records from the *end* cannot be detected from the chain
alone; ship ``mlserve audit verify --json``'s ``last_hash`` off the host to anchor it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlserve import config
from mlserve.names import canonical_json

GENESIS = "0" * 64
FILE_RE = re.compile(r"\d{4}-\d{2}-\d{2}\.jsonl")


def audit_dir(home: Path | None = None) -> Path:
    """``$MLSERVE_HOME/audit``."""
    return (home or config.home()).expanduser() / "audit"


def canonical(record: dict[str, Any]) -> bytes:
    """Sorted keys, no spaces, UTF-8 (the store's manifest encoding): the bytes a record is stored and hashed as."""
    return canonical_json(record)


def record_hash(record: dict[str, Any]) -> str:
    """sha256 hex of the record's canonical JSON without its ``hash`` field."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def utc_now() -> str:
    """The current UTC time, ISO 8601 with microseconds and ``Z``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log_files(directory: Path) -> list[Path]:
    """The day files of an audit directory, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if FILE_RE.fullmatch(p.name))


def _last_line(path: Path) -> bytes | None:
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        pos, tail = end, b""
        while pos > 0:
            step = min(4096, pos)
            pos -= step
            fh.seek(pos)
            tail = fh.read(step) + tail
            stripped = tail.rstrip(b"\n")
            if b"\n" in stripped:
                return stripped.rsplit(b"\n", 1)[1]
        stripped = tail.rstrip(b"\n")
        return stripped or None


def _hash_of_line(line: bytes) -> str:
    try:
        value = json.loads(line).get("hash")
        if isinstance(value, str):
            return value
    except (ValueError, AttributeError):
        pass
    # A damaged last line: chain onto its bytes; `audit verify` reports the damage.
    return hashlib.sha256(line).hexdigest()


def last_hash(directory: Path, before: Path | None = None) -> str:
    """The hash of the newest record (in files older than ``before`` when given); GENESIS if none."""
    for path in reversed(log_files(directory)):
        if before is not None and path.name >= before.name:
            continue
        line = _last_line(path)
        if line:
            return _hash_of_line(line)
    return GENESIS


class AuditLog:
    """An appender that keeps the current day's file open; one per process is enough."""

    def __init__(self, directory: Path, fsync: bool | None = None) -> None:
        self.directory = directory
        self.fsync = fsync if fsync is not None else config.env_value("AUDIT_FSYNC", "0") not in ("", "0")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        self._lock_fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._fd: int | None = None
        self._path: Path | None = None
        self._end: int | None = None  # where our last record ended; another writer moves it
        self._prev = GENESIS
        self._thread_lock = threading.Lock()

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Add ``event`` (plus ``time``, ``prev`` and ``hash``) as one record; returns it. Thread-safe.

        ``time`` is the append time, taken under the lock, so day files and the chain keep one order.
        It waits on a lock and may fsync: a server calls it off the event loop.
        """
        record = {k: v for k, v in event.items() if k not in ("time", "prev", "hash")}
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._write_locked(record)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        return record

    def _write_locked(self, record: dict[str, Any]) -> None:
        """Stamp, chain and write ``record``; the caller holds both locks."""
        # The time, the day file and the previous hash are read together under the lock (see the module docstring).
        record["time"] = utc_now()
        path = self.directory / f"{record['time'][:10]}.jsonl"
        if path != self._path:
            self._open(path)
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size != self._end:
            self._prev = last_hash(self.directory)
        record["prev"] = self._prev
        record["hash"] = record_hash(record)
        line = canonical(record) + b"\n"
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        if self.fsync:
            os.fsync(self._fd)
        self._end = size + len(line)
        self._prev = record["hash"]

    def _open(self, path: Path) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(self._fd, 0o600)
        self._path, self._end = path, None

    def close(self) -> None:
        """Release the file descriptors (after any append in flight on another thread)."""
        with self._thread_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            os.close(self._lock_fd)


def append(event: dict[str, Any], home: Path | None = None) -> dict[str, Any]:
    """Audit one administrative event (fsynced), e.g. ``append({"event": "key.create", "name": ...})``.

    ``event`` must be JSON-serialisable; ``time`` (UTC, append time), ``prev`` and ``hash`` are filled in.
    Returns the record as written.
    """
    log = AuditLog(audit_dir(home), fsync=True)
    try:
        return log.append(event)
    finally:
        log.close()


@dataclass
class VerifyResult:
    """What ``verify`` found: ok, or the first bad record's file, line and reason."""

    files: list[str] = field(default_factory=list)
    records: int = 0
    last_hash: str = GENESIS
    file: str | None = None
    line: int | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """No bad record."""
        return self.reason is None


def _read(paths: list[Path]) -> list[tuple[Path, int, bytes, dict[str, Any] | None]]:
    rows: list[tuple[Path, int, bytes, dict[str, Any] | None]] = []
    for path in paths:
        data = path.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for i, raw in enumerate(lines, 1):
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            rows.append((path, i, raw, parsed if isinstance(parsed, dict) else None))
    return rows


def _problem(raw: bytes, rec: dict[str, Any] | None) -> str | None:
    if rec is None:
        return "it is not a valid JSON record (edited or truncated)"
    if not isinstance(rec.get("hash"), str) or not isinstance(rec.get("prev"), str):
        return "it lacks its hash or prev field (edited)"
    if record_hash(rec) != rec["hash"]:
        return "its content does not match its hash (edited)"
    if canonical(rec) != raw:
        return "it is not in the canonical form it was written in (edited)"
    return None


def verify(file: Path | None = None, home: Path | None = None) -> VerifyResult:
    """Check the chain of the whole log from its genesis, or of one FILE (from the file before it)."""
    if file is None:
        directory = audit_dir(home)
        paths = log_files(directory)
        expected = GENESIS
    else:
        paths = [file]
        expected = last_hash(file.parent, before=file) if FILE_RE.fullmatch(file.name) else GENESIS
    result = VerifyResult(files=[str(p) for p in paths])
    rows = _read(paths)
    later: dict[str, int] = {}
    for idx, (_, _, _, rec) in enumerate(rows):
        if rec is not None and isinstance(rec.get("hash"), str):
            later[rec["hash"]] = idx
    for idx, (path, line, raw, rec) in enumerate(rows):
        reason = _problem(raw, rec)
        if reason is None and rec is not None and rec["prev"] != expected:
            if later.get(rec["prev"], -1) > idx or later.get(expected, -1) > idx:
                reason = "it is out of order: records were reordered"
            elif idx == 0 and expected == GENESIS:
                reason = "the records before it are missing (removed)"
            else:
                reason = "its prev does not match the record before it: a record was removed or inserted"
        if reason is not None:
            result.file, result.line, result.reason = str(path), line, reason
            return result
        assert rec is not None
        expected = rec["hash"]
        result.records += 1
    result.last_hash = expected
    return result
