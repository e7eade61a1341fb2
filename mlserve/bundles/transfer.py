"""Export a bundle as one tar file and import it back, verifying every byte.

An archive is input from elsewhere: import trusts nothing in it. Every blob is hashed, every
GGUF is inspected as ``pack`` would (and its facts must be the manifest's), and the serving
defaults must lie within the bounds pack holds recipes to, all before anything is committed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from mlserve.bundles import gguf_info
from mlserve.bundles.packing import check_serving_defaults
from mlserve.bundles.store import Bundle, StagedBlob, Store
from mlserve.errors import ArchiveError, ConflictError, GGUFError, IntegrityError
from mlserve.fsutil import CHUNK, fsync_dir
from mlserve.names import HEX_RE, canonical_json, check_name, check_version

MANIFEST = "manifest.json"
BLOB_RE = re.compile(r"blobs/sha256-([0-9a-f]{64})")
MAX_MANIFEST = 16 << 20
_ABSENT = object()


def export_bundle(store: Store, bundle: Bundle, out: Path) -> int:
    """Write ``bundle`` to ``out`` atomically as a tar of manifest.json and blobs/; return its size."""
    problems = store.verify(bundle)
    if problems:
        raise IntegrityError(f"Bundle {bundle.ref} is damaged ({problems[0]}); not exporting it.")
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                data = canonical_json(bundle.manifest)
                info = tarfile.TarInfo(MANIFEST)
                info.size, info.mode = len(data), 0o644
                import io

                tar.addfile(info, io.BytesIO(data))
                for entry in bundle.manifest["files"]:
                    path = store.blob_path(entry["sha256"])
                    info = tarfile.TarInfo(f"blobs/sha256-{entry['sha256']}")
                    info.size, info.mode = path.stat().st_size, 0o444
                    with open(path, "rb") as blob:
                        tar.addfile(info, blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out.stat().st_size


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ArchiveError(f"The archive holds an absolute path ({name!r}); refusing to import it.")
    if ".." in Path(name).parts:
        raise ArchiveError(f"The archive holds a path that climbs out with '..' ({name!r}); refusing to import it.")
    if member.issym() or member.islnk():
        raise ArchiveError(f"The archive holds a link ({name!r}); refusing to import it.")
    if not member.isfile():
        raise ArchiveError(f"The archive holds {name!r}, which is not a regular file; refusing to import it.")
    if name != MANIFEST and not BLOB_RE.fullmatch(name):
        raise ArchiveError(f"The archive holds an unexpected file {name!r}; it is not an mlserve export.")


def _parse_manifest(data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
        check_name(manifest["name"])
        check_version(manifest["version"])
        files = manifest["files"]
        if not isinstance(files, list) or not files:
            raise ValueError("no files")
        for f in files:
            if not (HEX_RE.fullmatch(f["sha256"]) and isinstance(f["size"], int) and isinstance(f["name"], str)):
                raise ValueError("bad files list")
        # list and show read these; a manifest without them would break every later command.
        if not isinstance(manifest["gguf"], dict) or not isinstance(manifest["gguf"]["architecture"], str):
            raise ValueError("bad gguf facts")
        if not isinstance(manifest["created_at"], str):
            raise ValueError("bad created_at")
        if not (isinstance(manifest["serving"], dict) and isinstance(manifest["provenance"], dict)):
            raise ValueError("bad serving or provenance")
    except (ValueError, KeyError, TypeError) as exc:
        raise ArchiveError(f"The archive's manifest.json is not a valid mlserve manifest ({exc}).") from exc
    return dict(manifest)


def import_archive(store: Store, archive: Path) -> tuple[Bundle, bool]:
    """Import an export tar; every check passes before anything becomes visible."""
    staged: dict[str, StagedBlob] = {}
    try:
        manifest = _read_archive(store, archive, staged)
        wanted = {f["sha256"]: f for f in manifest["files"]}
        for sha, entry in wanted.items():
            blob = staged.get(sha)
            if blob is None:
                raise ArchiveError(f"The archive lacks the blob sha256-{sha[:12]} that its manifest names.")
            if blob.size != entry["size"]:
                raise IntegrityError(
                    f"Blob sha256-{sha[:12]} has {blob.size} bytes; the manifest says {entry['size']}."
                )
        _check_models(manifest, staged)
        check_serving_defaults(manifest["serving"].get("defaults", {}), "The archive's manifest", ArchiveError)
        with store.lock():
            existing = store.get(manifest["name"], manifest["version"])
            if existing is not None:
                if canonical_json(existing.manifest) == canonical_json(manifest):
                    return existing, False
                raise ConflictError(
                    f"{manifest['name']}:{manifest['version']} already exists here with a different manifest.",
                    "Remove it first with `mlserve rm`, or import into another MLSERVE_HOME.",
                )
            for sha in wanted:
                store.commit_blob(staged.pop(sha))
            return store.write_manifest(manifest), True
    finally:
        for blob in staged.values():
            store.discard(blob.path)


def _check_models(manifest: dict[str, Any], staged: dict[str, StagedBlob]) -> None:
    """Inspect every model blob as pack does; the first one's facts must be the manifest's ``gguf``."""
    models = [f for f in manifest["files"] if f.get("role", "model") == "model" or f["name"].endswith(".gguf")]
    if not any(f.get("role", "model") == "model" for f in models):
        raise ArchiveError("The archive's manifest names no model file; it is not an mlserve bundle.")
    facts: gguf_info.GGUFFacts | None = None
    for entry in models:
        blob = staged[entry["sha256"]]
        label = f"The archive's {entry['name']!r} (blob sha256-{entry['sha256'][:12]})"
        try:
            found = gguf_info.inspect(blob.path)
        except GGUFError as exc:
            message = exc.message.replace(str(blob.path), label)
            raise GGUFError(message, "The archive is damaged or was not written by `mlserve export`.") from exc
        if facts is None and entry.get("role", "model") == "model":
            facts = found
    assert facts is not None
    derived, claimed = facts.to_dict(), manifest["gguf"]
    wrong = sorted(k for k in derived.keys() | claimed.keys() if claimed.get(k, _ABSENT) != derived.get(k, _ABSENT))
    if wrong:
        key, more = wrong[0], f" (also {', '.join(wrong[1:])})" if len(wrong) > 1 else ""
        raise ArchiveError(
            f"The archive's manifest does not match its model file: the file has {key}={derived.get(key)!r}, "
            f"the manifest {claimed.get(key, 'nothing')!r}{more}.",
            "Export the bundle again from a store where `mlserve verify` passes.",
        )


def _read_archive(store: Store, archive: Path, staged: dict[str, StagedBlob]) -> dict[str, Any]:
    manifest: dict[str, Any] | None = None
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                _check_member(member)
                fh = tar.extractfile(member)
                assert fh is not None
                if member.name == MANIFEST:
                    if member.size > MAX_MANIFEST:
                        raise ArchiveError("The archive's manifest.json is implausibly large.")
                    if manifest is not None:
                        raise ArchiveError("The archive holds manifest.json twice; refusing to import it.")
                    manifest = _parse_manifest(fh.read())
                    continue
                expected = BLOB_RE.fullmatch(member.name).group(1)  # type: ignore[union-attr]
                blob = store.stage_stream(iter(functools.partial(fh.read, CHUNK), b""))
                if blob.sha256 in staged:
                    store.discard(blob.path)  # a repeated member: keep one staged copy
                    continue
                staged[blob.sha256] = blob
                if blob.sha256 != expected:
                    raise IntegrityError(
                        f"Blob {member.name} in the archive has sha256 {blob.sha256}, not {expected}; "
                        "the file is damaged."
                    )
    except FileNotFoundError as exc:
        raise ArchiveError(f"{archive} does not exist.") from exc
    except (tarfile.TarError, EOFError) as exc:
        # tarfile lists every compression it tried on separate lines; the first line says enough.
        detail = (str(exc).splitlines() or ["damaged"])[0].rstrip(":")
        raise ArchiveError(f"{archive} is not a readable tar archive ({detail}).") from exc
    except IsADirectoryError as exc:
        raise ArchiveError(f"{archive} is a directory, not an export tar.") from exc
    if manifest is None:
        raise ArchiveError(f"{archive} has no manifest.json; it is not an mlserve export.")
    return manifest
