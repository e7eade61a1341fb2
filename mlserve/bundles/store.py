"""The bundle store: content-addressed blobs, immutable manifests, channel pointers.

Layout under ``$MLSERVE_HOME``::

    blobs/sha256-HEX              model bytes, stored once whatever refers to them
    manifests/NAME/VERSION.json   one canonical JSON manifest per immutable version
    channels/NAME/CHANNEL.json    {"version", "digest", ...}; moves and history: mlserve.bundles.channels
    tmp/                          staging area; a live writer holds an flock on its file (mlserve.bundles.staging)
    lock                          flock guarding every change

Blobs are renamed into place before the manifest that names them, both under the
lock, so a crash at any point leaves either no bundle or a whole one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlserve import config
from mlserve.bundles import staging
from mlserve.errors import ConflictError, IntegrityError, NotFoundError, UsageError
from mlserve.fsutil import atomic_write_bytes, copy_hashing, fsync_dir, locked, sha256_file
from mlserve.names import canonical_json, check_channel, check_name, check_version, digest_of


def _version_key(version: str) -> tuple[int, int, str]:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


@dataclass(frozen=True)
class Bundle:
    """One immutable bundle version as stored."""

    name: str
    version: str
    digest: str
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        """``NAME:VERSION``."""
        return f"{self.name}:{self.version}"

    @property
    def model_sha256(self) -> str:
        """sha256 of the bundle's GGUF model file."""
        for entry in self.manifest["files"]:
            if entry.get("role", "model") == "model":
                return str(entry["sha256"])
        raise IntegrityError(f"Bundle {self.ref} has no model file in its manifest.")

    def describe(self) -> dict[str, Any]:
        """The manifest plus its digest, as printed by ``--json``."""
        return {**self.manifest, "digest": self.digest}


@dataclass(frozen=True)
class StagedBlob:
    """A file copied into the store's staging area, hashed, not yet visible."""

    path: Path
    sha256: str
    size: int


class Store:
    """Access to one ``$MLSERVE_HOME``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or config.home()).expanduser()
        self.blobs = self.root / "blobs"
        self.manifests = self.root / "manifests"
        self.channels = self.root / "channels"
        self.tmp = self.root / "tmp"
        self.lock_path = self.root / "lock"

    # -- locking and staging -------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock over every change to this store; cleans dead writers' temp files."""
        with locked(self.lock_path):
            staging.sweep(self.tmp)
            yield

    def temp_path(self, kind: str) -> Path:
        """A fresh empty file in the staging area, flocked by this process until committed or discarded."""
        return staging.new_temp(self.tmp, kind)

    def discard(self, path: Path) -> None:
        """Delete a staged file that will not be committed."""
        path.unlink(missing_ok=True)
        staging.HELD.release(path)

    def stage_file(
        self,
        src: Path,
        progress: Callable[[int], None] | None = None,
        link: bool = False,
    ) -> StagedBlob:
        """Copy (or hard-link, when ``link`` and on one filesystem) ``src`` into staging."""
        linked = staging.link_temp(src, self.tmp, "blob") if link else None
        if linked is not None:
            # Never fall through to the copy once linked: opening it for writing would truncate src.
            try:
                return StagedBlob(linked, sha256_file(linked, progress), linked.stat().st_size)
            except BaseException:
                self.discard(linked)
                raise
        tmp = self.temp_path("blob")
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                sha, size = copy_hashing(fin, fout, progress)
                fout.flush()
                os.fsync(fout.fileno())
        except BaseException:
            self.discard(tmp)
            raise
        return StagedBlob(tmp, sha, size)

    def stage_stream(
        self,
        chunks: Iterator[bytes],
    ) -> StagedBlob:
        """Write an iterator of byte chunks into staging, hashing as it goes."""
        import hashlib

        tmp = self.temp_path("blob")
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as fout:
                for block in chunks:
                    digest.update(block)
                    fout.write(block)
                    size += len(block)
                fout.flush()
                os.fsync(fout.fileno())
        except BaseException:
            # A source that fails midway (a truncated archive) must not leave half a blob behind.
            self.discard(tmp)
            raise
        return StagedBlob(tmp, digest.hexdigest(), size)

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this sha256 lives."""
        return self.blobs / f"sha256-{sha256}"

    def commit_blob(self, staged: StagedBlob) -> Path:
        """Move a staged blob into place (caller holds the lock); identical blobs are kept once."""
        target = self.blob_path(staged.sha256)
        self.blobs.mkdir(parents=True, exist_ok=True)
        if target.exists() and target.stat().st_size == staged.size and sha256_file(target) == staged.sha256:
            self.discard(staged.path)
            return target
        # A staged file with other names is a hard link to the user's file (the Hugging Face cache):
        # chmod would change that file too, so it keeps its mode. The link saves a copy of a
        # multi-GB model; the store never writes a blob in place and `verify` re-hashes it, so
        # read-only is a guard we give our own copies, not one we may force onto someone's file.
        if os.stat(staged.path).st_nlink == 1:
            os.chmod(staged.path, 0o444)
        os.replace(staged.path, target)
        staging.HELD.release(staged.path)
        fsync_dir(self.blobs)
        return target

    # -- manifests -----------------------------------------------------------
    def _manifest_path(self, name: str, version: str) -> Path:
        return self.manifests / name / f"{version}.json"

    def write_manifest(self, manifest: dict[str, Any]) -> Bundle:
        """Write a new manifest (caller holds the lock; every blob is already committed)."""
        name, version = manifest["name"], manifest["version"]
        for entry in manifest["files"]:
            if not self.blob_path(entry["sha256"]).is_file():
                raise IntegrityError(f"Blob {entry['sha256'][:12]} is missing; not writing {name}:{version}.")
        data = canonical_json(manifest)
        path = self._manifest_path(name, version)
        if path.exists():
            raise ConflictError(f"Version {name}:{version} already exists.")
        atomic_write_bytes(path, data, self.tmp)
        return Bundle(name, version, digest_of(data), manifest)

    def _load(self, path: Path) -> Bundle:
        data = path.read_bytes()
        try:
            manifest = json.loads(data)
            return Bundle(manifest["name"], manifest["version"], digest_of(data), manifest)
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(
                f"Manifest {path} is damaged and cannot be read.", "Remove that file, then re-pull or re-import it."
            ) from exc

    def bundles(self, name: str | None = None) -> list[Bundle]:
        """Every stored bundle (of one name, when given), by name then version."""
        pattern = f"{name}/*.json" if name else "*/*.json"
        found = [self._load(p) for p in self.manifests.glob(pattern)] if self.manifests.is_dir() else []
        return sorted(found, key=lambda b: (b.name, _version_key(b.version)))

    def get(self, name: str, version: str) -> Bundle | None:
        """One version, or None."""
        path = self._manifest_path(name, version)
        return self._load(path) if path.is_file() else None

    def next_version(self, name: str) -> str:
        """The next automatic version number for ``name``."""
        numbers = [int(b.version) for b in self.bundles(name) if b.version.isdigit()]
        return str(max(numbers, default=0) + 1)

    def remove_manifest(self, bundle: Bundle) -> None:
        """Delete a version's manifest and any blob no other manifest uses (caller holds the lock)."""
        path = self._manifest_path(bundle.name, bundle.version)
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
        with contextlib.suppress(OSError):
            path.parent.rmdir()
        used = {e["sha256"] for b in self.bundles() for e in b.manifest["files"]}
        for entry in bundle.manifest["files"]:
            if entry["sha256"] not in used:
                self.blob_path(entry["sha256"]).unlink(missing_ok=True)

    # -- channels --------------------------------------------------------------
    def channel_path(self, name: str, channel: str) -> Path:
        """The pointer file of ``NAME@CHANNEL``."""
        return self.channels / name / f"{channel}.json"

    def channel_pointer(self, name: str, channel: str) -> dict[str, Any] | None:
        """The pointer file's content (``version``, ``digest``, maybe ``previous`` and ``canary``), or None."""
        path = self.channel_path(name, channel)
        try:
            body = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            body = None
        if not isinstance(body, dict) or "version" not in body:
            raise IntegrityError(f"Channel pointer {path} is damaged.", "Promote a version to that channel again.")
        return body

    def channel_target(self, name: str, channel: str) -> str | None:
        """The (stable) version a channel points at, or None."""
        body = self.channel_pointer(name, channel)
        return None if body is None else str(body["version"])

    def write_channel(self, name: str, channel: str, body: dict[str, Any]) -> None:
        """Replace a channel's pointer file atomically (caller holds the lock)."""
        check_channel(channel)
        atomic_write_bytes(self.channel_path(name, channel), canonical_json(body), self.tmp)

    def set_channel(self, bundle: Bundle, channel: str) -> None:
        """Point a channel at a bundle (caller holds the lock)."""
        check_channel(channel)
        body = {"version": bundle.version, "digest": bundle.digest}
        atomic_write_bytes(self.channel_path(bundle.name, channel), canonical_json(body), self.tmp)

    def channels_of(self, bundle: Bundle) -> list[str]:
        """Channels that send requests to this bundle, as their stable target or their canary."""
        folder = self.channels / bundle.name
        if not folder.is_dir():
            return []
        found = []
        for path in folder.glob("*.json"):
            body = self.channel_pointer(bundle.name, path.stem) or {}
            if bundle.version in (body.get("version"), (body.get("canary") or {}).get("version")):
                found.append(path.stem)
        return sorted(found)

    # -- references ------------------------------------------------------------
    def resolve(self, ref: str) -> Bundle:
        """Resolve a REF (``NAME``, ``NAME:VERSION``, ``NAME@CHANNEL``, ``sha256:HEX``)."""
        if ref.startswith("sha256:"):
            return self._resolve_digest(ref)
        if "@" in ref:
            name, channel = ref.split("@", 1)
            check_name(name)
            check_channel(channel)
            version = self.channel_target(name, channel)
            if version is None:
                raise NotFoundError(f"Channel {ref} does not exist.", "See `mlserve list` and `mlserve promote`.")
            return self._must_get(name, version, ref)
        if ":" in ref:
            name, version = ref.split(":", 1)
            check_name(name)
            check_version(version)
            return self._must_get(name, version, ref)
        check_name(ref)
        production = self.channel_target(ref, "production")
        if production is not None:
            return self._must_get(ref, production, ref)
        versions = self.bundles(ref)
        if not versions:
            raise NotFoundError(f"No bundle named {ref!r} in {self.root}.", "Run `mlserve list` or `mlserve pull`.")
        return max(versions, key=lambda b: (b.manifest.get("created_at", ""), _version_key(b.version)))

    def _must_get(self, name: str, version: str, ref: str) -> Bundle:
        bundle = self.get(name, version)
        if bundle is None:
            raise NotFoundError(f"Bundle {ref} not found in {self.root}.", "Run `mlserve list` to see what is stored.")
        return bundle

    def _resolve_digest(self, ref: str) -> Bundle:
        prefix = ref.removeprefix("sha256:").lower()
        if not re.fullmatch(r"[0-9a-f]{12,64}", prefix):
            raise UsageError(f"Invalid digest reference {ref!r}.", "Give at least 12 hex digits after 'sha256:'.")
        hits = [b for b in self.bundles() if b.digest.removeprefix("sha256:").startswith(prefix)]
        if not hits:
            raise NotFoundError(f"No bundle has digest {ref}.")
        if len(hits) > 1:
            raise UsageError(f"Digest prefix {ref} matches {len(hits)} bundles.", "Give more hex digits.")
        return hits[0]

    # -- integrity -------------------------------------------------------------
    def verify(self, bundle: Bundle, progress: Callable[[int], None] | None = None) -> list[str]:
        """Re-hash every blob of a bundle; return the problems found (empty when intact)."""
        problems = []
        for entry in bundle.manifest["files"]:
            path = self.blob_path(entry["sha256"])
            if not path.is_file():
                problems.append(f"blob {entry['sha256'][:12]} ({entry['name']}) is missing")
                continue
            actual = sha256_file(path, progress)
            if actual != entry["sha256"]:
                problems.append(f"blob {entry['sha256'][:12]} ({entry['name']}) has sha256 {actual[:12]}")
        return problems
