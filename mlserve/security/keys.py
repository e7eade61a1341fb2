"""API keys: create, list, revoke and check; only sha256 hashes are ever stored.

``$MLSERVE_HOME/keys.json`` (mode 0600, written atomically under the store lock)::

    {"keys": [{"name", "sha256", "scopes", "created_at", "revoked_at"}]}

A key is 256 bits from ``secrets`` (``mls_`` + 43 url-safe characters) shown once at
creation. Because a key has 256 bits of entropy, a plain (unsalted, fast) sha256 is
enough: nobody can brute-force a 2**256 preimage, so salting or a slow KDF (needed for
human passwords) would add cost without adding safety.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlserve import config
from mlserve.errors import ConflictError, InvalidInputError, NotFoundError, UsageError
from mlserve.fsutil import atomic_write_bytes, locked
from mlserve.names import NAME_RE

SCOPES = ("infer", "admin", "metrics")
log = logging.getLogger("mlserve.keys")
_UNSTATABLE = (-1,)  # the stamp of a key file that cannot even be stat()ed
KEY_PREFIX = "mls_"


@dataclass(frozen=True)
class KeyRecord:
    """One stored key: its name, the sha256 of the secret, scopes and lifecycle times."""

    name: str
    sha256: str
    scopes: tuple[str, ...]
    created_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        """Not revoked."""
        return self.revoked_at is None

    def allows(self, scope: str) -> bool:
        """Whether this key grants ``scope`` (admin grants every scope)."""
        return "admin" in self.scopes or scope in self.scopes

    def public(self) -> dict[str, Any]:
        """What ``keys list`` shows: never the hash."""
        return {
            "name": self.name,
            "scopes": list(self.scopes),
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


def hash_key(key: str) -> str:
    """The stored form of a key (see the module docstring for why plain sha256 suffices)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def keys_path(home: Path | None = None) -> Path:
    """``$MLSERVE_HOME/keys.json``."""
    return (home or config.home()) / "keys.json"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(data: bytes, path: Path) -> list[KeyRecord]:
    try:
        doc = json.loads(data)
        return [
            KeyRecord(k["name"], k["sha256"], tuple(k["scopes"]), k["created_at"], k.get("revoked_at"))
            for k in doc["keys"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(
            f"{path} is not a valid key file.", "Restore it from a backup or move it away and create new keys."
        ) from exc


def load(path: Path) -> list[KeyRecord]:
    """Every key record in ``path`` (none when the file does not exist)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return _parse(data, path)


class KeyStore:
    """The key file of one ``$MLSERVE_HOME``; every change holds the store lock."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = (home or config.home()).expanduser()
        self.path = keys_path(self.home)

    def _write(self, records: list[KeyRecord]) -> None:
        doc = {"keys": [{**asdict(r), "scopes": list(r.scopes)} for r in records]}
        data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
        atomic_write_bytes(self.path, data, self.home / "tmp", mode=0o600)

    def records(self) -> list[KeyRecord]:
        """All keys, revoked ones included."""
        return load(self.path)

    def create(self, name: str, scopes: list[str] | None = None) -> tuple[KeyRecord, str]:
        """Make a new key; returns the record and the secret, which is never stored."""
        if not NAME_RE.fullmatch(name):
            raise UsageError(f"Invalid key name {name!r}.", "Key names are 1-64 of a-z, 0-9, '.', '_', '-'.")
        chosen = tuple(dict.fromkeys(scopes or ["infer"]))
        bad = [s for s in chosen if s not in SCOPES]
        if bad:
            raise UsageError(f"Unknown scope {bad[0]!r}.", f"Scopes are {', '.join(SCOPES)}.")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(name, hash_key(secret), chosen, _now())
        with locked(self.home / "lock"):
            records = self.records()
            if any(r.name == name and r.active for r in records):
                raise ConflictError(
                    f"A key named {name} already exists.", f"Revoke it first: mlserve keys revoke {name}"
                )
            # A revoked key's name may be reused; the old record is replaced (its revocation is in the audit log).
            self._write([r for r in records if r.name != name] + [record])
        return record, secret

    def revoke(self, name: str) -> KeyRecord:
        """Revoke a key by name (revoking a revoked key is a no-op)."""
        with locked(self.home / "lock"):
            records = self.records()
            found = next((r for r in records if r.name == name), None)
            if found is None:
                raise NotFoundError(f"No key named {name}.", "Run `mlserve keys list` to see the keys.")
            if not found.active:
                return found
            revoked = KeyRecord(found.name, found.sha256, found.scopes, found.created_at, _now())
            self._write([revoked if r.name == name else r for r in records])
        return revoked


class KeyRing:
    """The server's view of the key file, re-read when it changes (checked at most once a second).

    It fails closed: once the ring has held a key (at start or later), it stays enabled
    for the life of the process. A key file that then disappears or lists no key refuses
    every request (more likely an accident than a wish to open the server; restart the
    server to run keyless); one that cannot be read or parsed keeps the last good keys.
    A readable file with fewer keys is obeyed, so revocation works as before.
    """

    def __init__(self, path: Path | None, check_interval: float = 1.0) -> None:
        self.path = path
        self.check_interval = check_interval
        self._active: list[KeyRecord] = []
        self._enabled = False
        self._stamp: tuple[int, ...] | None = None
        self._checked = 0.0
        self.refresh(force=True)

    @property
    def enabled(self) -> bool:
        """Whether keys are required: from the first time the key file held any key, revoked or not."""
        return self._enabled

    def refresh(self, force: bool = False) -> None:
        """Re-read the file if its inode, size or mtime changed; a stat at most once per interval.

        ``force`` (at start) raises ``InvalidInputError`` for a file that cannot be read or parsed.
        """
        now = time.monotonic()
        if self.path is None or (not force and now - self._checked < self.check_interval):
            return
        self._checked = now
        try:
            st = os.stat(self.path)
            # ctime too: a chmod that makes an unreadable file readable again changes only ctime.
            stamp: tuple[int, ...] | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            stamp = None
        except OSError as exc:  # e.g. its directory turned unreadable: as good as a file we cannot read
            if self._stamp != _UNSTATABLE or force:
                self._stamp = _UNSTATABLE
                self._unreadable(exc, force)
            return
        if stamp == self._stamp and not force:
            return
        self._stamp = stamp  # warn once per change, not once per second
        try:
            records = self._read() if stamp is not None else []
        except (InvalidInputError, OSError) as exc:
            self._unreadable(exc, force)
            return
        active = [r for r in records if r.active]
        if self._enabled and not active:
            log.warning("%s is gone or holds no active key; every request is refused until one is created.", self.path)
        self._active = active
        self._enabled = self._enabled or bool(records)

    def _read(self) -> list[KeyRecord]:
        assert self.path is not None
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []  # removed between the stat and the read
        return _parse(data, self.path)

    def _unreadable(self, exc: Exception, force: bool) -> None:
        """A key file we cannot read or parse keeps the last good keys: failing open would drop authentication."""
        if force:
            if isinstance(exc, InvalidInputError):
                raise exc
            raise InvalidInputError(
                f"The key file {self.path} cannot be read ({type(exc).__name__}).",
                "Fix its permissions so the server's user can read it.",
            ) from exc
        self._enabled = True  # a file we cannot see into may hold keys
        # Only the exception type: a parse error message might quote part of the file.
        log.warning(
            "The key file %s cannot be read or parsed (%s); keeping the last good keys.", self.path, type(exc).__name__
        )

    def authenticate(self, presented: str) -> KeyRecord | None:
        """The active key matching ``presented``, compared in constant time against every key."""
        digest = hash_key(presented).encode()
        match = None
        for record in self._active:
            if hmac.compare_digest(digest, record.sha256.encode()):
                match = record
        return match
