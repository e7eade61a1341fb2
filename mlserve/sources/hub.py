"""The only user of ``huggingface_hub``: fetch one file of a Hub repo into the Hugging Face cache.

The environment is read at call time, not at import time as ``huggingface_hub`` does, so
``HF_ENDPOINT`` (an internal mirror), ``HF_TOKEN`` (gated repos), ``HF_HUB_OFFLINE`` and
``HF_HOME``/``HF_HUB_CACHE`` take effect for every pull. Every ``huggingface_hub`` and
transport exception is translated here into the ``MlserveError`` tree. huggingface_hub 2.x
raises httpx2's transport errors, so httpx2 is a declared dependency and huggingface-hub is
held below 3 (its majors change the HTTP stack, and with it the errors to catch).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from mlserve.errors import MlserveError, NotFoundError, SourceError, UsageError
from mlserve.sources.recipes import HF_RE

DEFAULT_ENDPOINT = "https://huggingface.co"
SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: ``progress(label, total)`` opens a byte-progress context yielding an ``advance(n)`` callback (or None).
ProgressFactory = Callable[[str, int | None], AbstractContextManager[Callable[[int], None] | None]]
_UNREACHABLE_HINT = (
    "Check the network, set HF_ENDPOINT to a reachable Hub mirror, or pull a recipe with a local source."
)


@dataclass(frozen=True)
class HubRef:
    """``hf://OWNER/REPO/FILE.gguf[@REVISION]``, parsed."""

    repo: str
    filename: str
    revision: str | None = None

    @classmethod
    def parse(cls, uri: str) -> HubRef:
        """Parse a hub URI; raise UsageError when it is malformed."""
        match = HF_RE.fullmatch(uri)
        if not match:
            raise UsageError(f"{uri!r} is not a Hub reference.", "Write it as hf://OWNER/REPO/FILE.gguf[@REVISION].")
        return cls(match["repo"], match["file"], match["revision"])

    @property
    def uri(self) -> str:
        """The reference as written, revision included when given."""
        tail = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo}/{self.filename}{tail}"


@dataclass(frozen=True)
class HubFile:
    """A file resolved on the Hub and present in the Hugging Face cache."""

    path: Path
    commit: str
    lfs_sha256: str | None
    size: int | None
    endpoint: str


def endpoint() -> str:
    """The Hub endpoint: ``$HF_ENDPOINT`` or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    explicit = os.environ.get("HF_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        return Path(hf_home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def fetch(ref: HubRef, progress: ProgressFactory | None = None) -> HubFile:
    """Resolve ``ref`` on the Hub and make sure its bytes are in the HF cache (downloading only when absent)."""
    # huggingface_hub reads HF_HUB_OFFLINE once at import; mirror the current environment into it.
    constants.HF_HUB_OFFLINE = offline()
    url = endpoint()
    if constants.HF_HUB_OFFLINE:
        return _from_cache(ref, url, reason=None)
    token = os.environ.get("HF_TOKEN") or None
    try:
        meta = get_hf_file_metadata(
            hf_hub_url(ref.repo, ref.filename, revision=ref.revision, endpoint=url), token=token, endpoint=url
        )
    except (httpx2.TransportError, OSError) as exc:
        if isinstance(exc, HfHubHTTPError) and not _is_server_error(exc):
            raise _translate(exc, ref, url) from exc
        return _from_cache(ref, url, reason=_translate(exc, ref, url))
    if not meta.commit_hash or not meta.etag:
        raise SourceError(
            f"{url} answered for {ref.uri} without the X-Repo-Commit and ETag headers a Hub sends.",
            "Check that HF_ENDPOINT points at a Hugging Face Hub or a compatible mirror.",
        )
    try:
        with _tqdm_class(progress, f"downloading {Path(ref.filename).name}") as bar_class:
            path = hf_hub_download(
                ref.repo,
                ref.filename,
                revision=ref.revision,
                cache_dir=cache_dir(),
                endpoint=url,
                token=token,
                tqdm_class=bar_class,
            )
    except (httpx2.TransportError, OSError, ValueError) as exc:
        raise _translate(exc, ref, url) from exc
    found = Path(path)
    commit = _commit_of(found, ref)
    if commit != meta.commit_hash:
        raise SourceError(f"Revision {ref.revision or 'main'} of {ref.repo} moved during the pull.", "Pull again.")
    lfs = meta.etag if SHA256_RE.fullmatch(meta.etag) else None
    return HubFile(found, commit, lfs, meta.size, url)


def discard(hub_file: HubFile) -> None:
    """Remove a cached file whose bytes failed verification, so the next pull downloads it afresh."""
    root = cache_dir().resolve()
    for victim in (hub_file.path.resolve(), hub_file.path):
        if victim.parent.resolve().is_relative_to(root):
            victim.unlink(missing_ok=True)


def _from_cache(ref: HubRef, url: str, reason: MlserveError | None) -> HubFile:
    """The cached copy of ``ref`` when the Hub cannot be asked; raise ``reason`` (or an offline error) otherwise."""
    try:
        found = hf_hub_download(
            ref.repo, ref.filename, revision=ref.revision, cache_dir=cache_dir(), endpoint=url, local_files_only=True
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError) as exc:
        if reason is not None:
            raise reason from exc
        raise SourceError(
            f"HF_HUB_OFFLINE is set and {ref.uri} is not in the Hugging Face cache ({cache_dir()}).",
            "Unset HF_HUB_OFFLINE to download it, or pull a recipe with a local or package source.",
        ) from exc
    path = Path(found)
    blob = path.resolve().name
    size = path.stat().st_size
    return HubFile(path, _commit_of(path, ref), blob if SHA256_RE.fullmatch(blob) else None, size, url)


def _commit_of(path: Path, ref: HubRef) -> str:
    """The commit in a cache path ``.../snapshots/COMMIT/FILENAME``."""
    return path.parents[len(Path(ref.filename).parts) - 1].name


def _is_server_error(exc: HfHubHTTPError) -> bool:
    response = exc.response
    return response is not None and response.status_code >= 500


def _status(exc: HfHubHTTPError) -> int | None:
    return exc.response.status_code if exc.response is not None else None


def _translate(exc: BaseException, ref: HubRef, url: str) -> MlserveError:
    """One or two plain sentences for a failed Hub call."""
    revision = ref.revision or "main"
    if isinstance(exc, GatedRepoError):
        if _status(exc) == 403 or os.environ.get("HF_TOKEN"):
            return SourceError(
                f"{ref.repo} is a gated repository and the token in HF_TOKEN has no access to it (HTTP 403).",
                "Accept the model's terms on the Hub with that account, or set HF_TOKEN to a token that has access.",
            )
        return SourceError(
            f"{ref.repo} is a gated repository and HF_TOKEN is not set (HTTP 401).",
            "Accept the model's terms on the Hub, then set HF_TOKEN to a read token.",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return NotFoundError(
            f"Repository {ref.repo} was not found at {url} (HTTP {_status(exc)}).",
            "Check the OWNER/REPO spelling; for a private repository set HF_TOKEN.",
        )
    if isinstance(exc, RevisionNotFoundError):
        return NotFoundError(f"Revision {revision} does not exist in {ref.repo} at {url}.", "Check the @REVISION part.")
    if isinstance(exc, RemoteEntryNotFoundError):
        return NotFoundError(
            f"File {ref.filename} is not in {ref.repo} at revision {revision} ({url}).",
            "Check the file name; the repository's file list is on its Hub page.",
        )
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        if status in (401, 403):
            return SourceError(
                f"The Hub at {url} refused access to {ref.uri} (HTTP {status}).",
                "Set HF_TOKEN to a token with read access to the repository.",
            )
        return SourceError(f"The Hub at {url} failed to serve {ref.uri} (HTTP {status}).", _UNREACHABLE_HINT)
    if isinstance(exc, FileMetadataError):
        return SourceError(
            f"{url} does not answer like a Hugging Face Hub for {ref.uri}.",
            "Check that HF_ENDPOINT points at a Hub or a compatible mirror.",
        )
    if isinstance(exc, OfflineModeIsEnabled):
        return SourceError(f"HF_HUB_OFFLINE is set, so {ref.uri} cannot be downloaded.", "Unset HF_HUB_OFFLINE.")
    if isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError)):
        detail = str(exc).strip() or type(exc).__name__
        return SourceError(f"Cannot reach the Hugging Face Hub at {url} ({detail}).", _UNREACHABLE_HINT)
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return SourceError(f"Downloading {ref.uri} from {url} failed: {detail}", "Pull again; " + _UNREACHABLE_HINT)


@contextmanager
def _tqdm_class(progress: ProgressFactory | None, label: str) -> Iterator[type[Any]]:
    """A tqdm class for huggingface_hub that reports bytes to ``progress`` and never draws itself."""
    stack = ExitStack()
    state: dict[str, Callable[[int], None] | None] = {}

    class _Bar(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
            # The first bar (the file's) reports; any other bar huggingface_hub opens stays silent.
            self._advance: Callable[[int], None] | None = None
            if progress is not None and "advance" not in state:
                state["advance"] = stack.enter_context(progress(label, kwargs.get("total")))
                self._advance = state["advance"]

        def update(self, n: float | None = 1) -> bool | None:
            if self._advance is not None and n:
                self._advance(int(n))
            return None

    with stack:
        yield _Bar
