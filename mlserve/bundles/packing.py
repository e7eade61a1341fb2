"""Turn a GGUF file into a bundle version: validate, stage, hash, commit."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlserve import __version__
from mlserve.bundles import gguf_info
from mlserve.bundles.store import Bundle, StagedBlob, Store
from mlserve.errors import ConflictError, IntegrityError, InvalidInputError
from mlserve.names import check_name, check_version
from mlserve.sources.recipes import Recipe

MANIFEST_SCHEMA = 1
# The serving defaults a manifest may carry, each with its type and inclusive bounds. They size
# llama.cpp's allocations (ctx_size x parallel KV cells) and reach C ints, so a manifest from an
# archive is held to them as a recipe is. ctx_size may exceed the model's training context:
# llama.cpp accepts that (RoPE scaling), and pack's default 4096 exceeds small models' own.
SERVING_BOUNDS: dict[str, tuple[type, float, float]] = {
    "ctx_size": (int, 16, 1 << 20),
    "parallel": (int, 1, 256),
    "threads": (int, 1, 1024),
    "gpu_layers": (int, -1, 1 << 16),
    "max_tokens": (int, 1, 1 << 20),
    "top_k": (int, 0, 1 << 20),
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "min_p": (float, 0.0, 1.0),
    "repeat_penalty": (float, 0.01, 100.0),
    "draft_max": (int, 1, 32),
    "max_step_ms": (float, 10.0, 10000.0),
}
_NULLABLE = {"threads"}  # None: as many threads as the machine has


def now_utc() -> str:
    """The current UTC time in ISO 8601 with a Z."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def default_serving() -> dict[str, Any]:
    """Serving settings for a bundle packed without a recipe."""
    from mlserve.sources.recipes import Defaults

    return {"recipe": None, "defaults": Defaults().model_dump(), "chat_template": None, "stop": [], "prompts": {}}


def check_serving_defaults(defaults: Any, where: str, error: type[InvalidInputError] = InvalidInputError) -> None:
    """Refuse serving defaults outside ``SERVING_BOUNDS``, naming the field (recipes, pack and import)."""
    if not isinstance(defaults, dict):
        raise error(f"{where}: serving.defaults is not a mapping.")
    for key, (kind, low, high) in SERVING_BOUNDS.items():
        value: Any = defaults.get(key)
        if value is None and (key in _NULLABLE or key not in defaults):
            continue  # unset: serve uses its own default
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int and not isinstance(value, int):
            numeric = False
        if not numeric or not math.isfinite(value) or not low <= value <= high:
            what = "an integer" if kind is int else "a number"
            raise error(
                f"{where}: serving default '{key}' is {value!r}; it must be {what} from {low:g} to {high:g}.",
                "Fix that value where the bundle was made (its recipe), pack it again and re-export it.",
            )


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
    if recipe is not None:  # before any blob is committed, so a refusal leaves nothing behind
        check_serving_defaults(recipe.defaults.model_dump(), f"Recipe {recipe.name}")
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
