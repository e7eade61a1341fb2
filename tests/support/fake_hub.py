"""A small Hugging Face Hub look-alike on loopback, for running the real huggingface_hub client in tests.

It answers what ``hf_hub_download`` asks, the way huggingface.co does for LFS files:

* ``HEAD|GET /{owner}/{repo}/resolve/{revision}/{file}`` on the *hub* port: ``302`` to the
  *CDN* port (another origin, so the client does not follow it on HEAD) carrying
  ``X-Repo-Commit``, ``X-Linked-Etag`` (the LFS sha256) and ``X-Linked-Size``; errors carry
  ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``).
* ``GET /cdn/{sha256}`` on the CDN port: the bytes (or the corrupt bytes a test asked for).

No Xet headers are ever sent, so the client takes the plain HTTP path.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)$")
CDN_RE = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")


@dataclass
class FakeRepo:
    """One model repository with one commit."""

    commit: str
    files: dict[str, bytes] = field(default_factory=dict)
    gated_token: str | None = None


@dataclass
class FakeHub:
    """State shared by the hub and CDN servers; tests add repos and read the request log."""

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    # sha256 -> bytes to send instead of the real ones (a corrupt mirror)
    corrupt: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""
    cdn_url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, repo: str, filename: str, data: bytes, gated_token: str | None = None) -> str:
        """Add a file (creating the repo); return the file's sha256."""
        commit = hashlib.sha1(repo.encode()).hexdigest()
        entry = self.repos.setdefault(repo, FakeRepo(commit=commit))
        entry.files[filename] = data
        entry.gated_token = gated_token
        return hashlib.sha256(data).hexdigest()

    def log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def count(self, method: str, prefix: str) -> int:
        """How many requests with this method had a path starting with ``prefix``."""
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))

    def blob(self, sha: str) -> bytes | None:
        if sha in self.corrupt:
            return self.corrupt[sha]
        for repo in self.repos.values():
            for data in repo.files.values():
                if hashlib.sha256(data).hexdigest() == sha:
                    return data
        return None


def _handler(hub: FakeHub, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(self.path.split("?", 1)[0])
            hub.log(self.command, path)
            if role == "cdn":
                self._cdn(path, body)
            else:
                self._resolve(path)

        def _send(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = True) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body and data:
                self.wfile.write(data)

        def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})}
            self._send(status, headers, b"", body=False)

        def _resolve(self, path: str) -> None:
            match = RESOLVE_RE.match(path)
            repo = hub.repos.get(match["repo"]) if match else None
            if match is None or repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return
            if repo.gated_token is not None:
                auth = self.headers.get("Authorization")
                if auth is None:
                    self._error(401, "GatedRepo", "Access to this model is restricted.")
                    return
                if auth != f"Bearer {repo.gated_token}":
                    self._error(403, "GatedRepo", "Access to this model is restricted.")
                    return
            if match["revision"] not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", "Invalid rev id")
                return
            commit = {"X-Repo-Commit": repo.commit}
            data = repo.files.get(match["file"])
            if data is None:
                self._error(404, "EntryNotFound", "Entry not found", commit)
                return
            sha = hashlib.sha256(data).hexdigest()
            headers = {
                **commit,
                "Location": f"{hub.cdn_url}/cdn/{sha}",
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
            }
            self._send(302, headers, b"", body=False)

        def _cdn(self, path: str, body: bool) -> None:
            match = CDN_RE.match(path)
            data = hub.blob(match["sha"]) if match else None
            if data is None:
                self._send(404, {}, b"", body=False)
                return
            self._send(
                200, {"Content-Type": "application/octet-stream", "ETag": f'"{match and match["sha"]}"'}, data, body
            )

    return Handler


@contextmanager
def running_hub() -> Iterator[FakeHub]:
    """Start a hub and a CDN server on 127.0.0.1 (ports picked by the OS); stop them afterwards."""
    hub = FakeHub()
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, role)) for role in ("hub", "cdn")]
    hub.url, hub.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield hub
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        for t in threads:
            t.join(timeout=5)
