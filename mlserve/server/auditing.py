"""One audit record per inference request, written once its outcome is known (never any text).

The record holds who (key name, client address), what (route, model name, version,
digest, effective sampling parameters, token counts), the outcome (status, latency)
and the sha256 of the prompt as received; stop strings are counted, not recorded,
since they are client text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.types import Scope

from mlserve.engine.base import FinishEvent, Sampling

if TYPE_CHECKING:
    from mlserve.server.auth import Guard
    from mlserve.server.state import ServedModel

log = logging.getLogger("mlserve.server")
content_log = logging.getLogger("mlserve.content")
INFERENCE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})


def prompt_sha256(body: dict[str, Any]) -> str | None:
    """sha256 hex of the prompt as received: the text, or the canonical JSON of messages or token ids."""
    value = body.get("messages", body.get("prompt"))
    if value is None:
        return None
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
    else:
        data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
    return hashlib.sha256(data).hexdigest()


def _sampling(s: Sampling | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "repeat_penalty": s.repeat_penalty,
        "frequency_penalty": s.frequency_penalty,
        "presence_penalty": s.presence_penalty,
        "seed": s.seed,
        "stop_count": len(s.stop),
    }


class RequestAudit:
    """Collects one request's audit facts; ``finish`` writes the record exactly once."""

    def __init__(self, scope: Scope, rid: str, route: str) -> None:
        app = scope.get("app")
        self.guard: Guard | None = getattr(app.state, "guard", None) if app is not None else None
        self.rid, self.route = rid, route
        self.key: str | None = scope.get("mlserve.key")
        client = scope.get("client")
        self.client: str | None = client[0] if client else None
        self.started = time.monotonic()
        self.prompt_sha256: str | None = None
        self.done = False

    def prompt(self, body: dict[str, Any]) -> None:
        """Note the prompt's hash (and, only with ``serve --log-content``, log its text)."""
        self.prompt_sha256 = prompt_sha256(body)
        if self.guard is not None and self.guard.log_content:
            value = body.get("messages", body.get("prompt"))
            content_log.info("request %s prompt=%s", self.rid, json.dumps(value, ensure_ascii=False))

    def completion(self, text: str) -> None:
        """Log the completion text, only with ``serve --log-content``."""
        if self.guard is not None and self.guard.log_content:
            content_log.info("request %s completion=%s", self.rid, json.dumps(text, ensure_ascii=False))

    def finish(
        self,
        status: int,
        model: ServedModel | None = None,
        sampling: Sampling | None = None,
        fin: FinishEvent | None = None,
    ) -> None:
        """Write the record (once; later calls do nothing)."""
        if self.done:
            return
        self.done = True
        if self.guard is None or self.guard.audit is None:
            return
        record = {
            "event": "inference",
            "request_id": self.rid,
            "key": self.key,
            "client": self.client,
            "route": self.route,
            "model": model.name if model else None,
            "version": model.version if model else None,
            "digest": model.digest if model else None,
            "sampling": _sampling(sampling),
            "prompt_tokens": fin.prompt_tokens if fin else None,
            "completion_tokens": fin.completion_tokens if fin else None,
            "latency_s": round(time.monotonic() - self.started, 6),
            "status": status,
            "prompt_sha256": self.prompt_sha256,
        }
        try:
            self.guard.audit.append(record)
        except OSError as exc:
            log.error("audit record for request %s could not be written: %s", self.rid, exc.strerror)
