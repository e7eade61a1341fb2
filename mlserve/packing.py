"""Turn a GGUF file into a bundle version: validate, stage, hash, commit."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlserve import __version__, gguf_info
from mlserve.errors import ConflictError, IntegrityError
from mlserve.recipes import Recipe
from mlserve.store import Bundle, StagedBlob, Store, check_name, check_version

MANIFEST_SCHEMA = 1


def now_utc() -> str:
    """The current UTC time in ISO 8601 with a Z."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def default_serving() -> dict[str, Any]:
    """Serving settings for a bundle packed without a recipe."""
    from mlserve.recipes import Defaults

    return {"recipe": None, "defaults": Defaults().model_dump(), "chat_template": None, "stop": [], "prompts": {}}


def build_manifest(
    name: str,
    version: str,
    filename: str,
    staged: StagedBlob,
    facts: gguf_info.GGUFFacts,
    recipe: Recipe | None,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """The manifest of a new version (schema 1)."""
    return {
        "schema": MANIFEST_SCHEMA,
        "name": name,
        "version": version,
        "created_at": now_utc(),
        "mlserve_version": __version__,
        "files": [{"name": filename, "role": "model", "size": staged.size, "sha256": staged.sha256}],
        "gguf": facts.to_dict(),
        "serving": recipe.serving() if recipe else default_serving(),
        "provenance": provenance,
    }


def pack_file(
    store: Store,
    path: Path,
    name: str,
    version: str | None = None,
    recipe: Recipe | None = None,
    provenance: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    link: bool = False,
) -> tuple[Bundle, bool]:
    """Pack ``path`` as ``name`` (new version unless the same bytes are there); return (bundle, created)."""
    check_name(name)
    if version is not None:
        check_version(version)
    facts = gguf_info.inspect(path)
    staged = store.stage_file(path, progress, link=link)
    try:
        if recipe is not None and staged.sha256 != recipe.sha256:
            raise IntegrityError(
                f"{path} has sha256 {staged.sha256}, but recipe {recipe.name} pins {recipe.sha256}.",
                "Check that the file is the one the recipe names.",
            )
        prov = provenance or {"source": "local", "path": str(path.resolve())}
        return commit_staged(store, staged, path.name, facts, name, version, recipe, prov)
    finally:
        staged.path.unlink(missing_ok=True)


def commit_staged(
    store: Store,
    staged: StagedBlob,
    filename: str,
    facts: gguf_info.GGUFFacts,
    name: str,
    version: str | None,
    recipe: Recipe | None,
    provenance: dict[str, Any],
) -> tuple[Bundle, bool]:
    """Under the store lock: return the existing version for these bytes, or write a new one."""
    with store.lock():
        if version is not None:
            existing = store.get(name, version)
            if existing is not None:
                if existing.model_sha256 == staged.sha256:
                    store.commit_blob(staged)  # repairs the stored blob if it was damaged
                    return existing, False
                raise ConflictError(
                    f"{name}:{version} already exists with different bytes (sha256 {existing.model_sha256[:12]}, "
                    f"this file {staged.sha256[:12]}); versions are immutable.",
                    "Pack it under another --version, or leave --version out to get the next number.",
                )
        else:
            same = [b for b in store.bundles(name) if b.model_sha256 == staged.sha256]
            if same:
                store.commit_blob(staged)  # repairs the stored blob if it was damaged
                return same[-1], False
            version = store.next_version(name)
        store.commit_blob(staged)
        manifest = build_manifest(name, version, filename, staged, facts, recipe, provenance)
        return store.write_manifest(manifest), True
