"""The audit record of one request and the writer that appends it off the event loop.

A record holds who (key name, client address), what (route, model name, version, digest,
effective sampling parameters, token counts), the outcome (status, latency) and the sha256 of
the prompt as received; stop strings are counted, not recorded, since they are client text.
Never any text.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
from typing import TYPE_CHECKING, Any

from mlserve.engine.api import Sampling
from mlserve.names import canonical_text
from mlserve.security.audit import AuditLog

if TYPE_CHECKING:
    from mlserve.server.context import RequestContext

log = logging.getLogger("mlserve.server")


def prompt_sha256(value: Any) -> str | None:
    """sha256 hex of the prompt as received: the text, or the canonical JSON of messages or token ids."""
    if value is None:
        return None
    data = value if isinstance(value, str) else canonical_text(value)
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()


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


def record_of(ctx: RequestContext, status: int, latency: float) -> dict[str, Any]:
    """The audit record of a settled request."""
    m = ctx.model
    return {
        "event": "inference",
        "request_id": ctx.id,
        "key": ctx.key,
        "client": ctx.client,
        "route": ctx.path,
        "model": m.name if m else None,
        "version": m.version if m else None,
        "digest": m.digest if m else None,
        "sampling": _sampling(ctx.sampling),
        "prompt_tokens": ctx.prompt_tokens,
        "completion_tokens": ctx.completion_tokens,
        "latency_s": round(latency, 6),
        "status": status,
        "prompt_sha256": ctx.prompt_sha256,
    }


class AuditWriter:
    """Appends records in order on one worker thread, so flock and fsync never block the event loop."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlserve-audit")

    def submit(self, record: dict[str, Any]) -> concurrent.futures.Future[None]:
        """Queue one record; errors are logged (without the record), never raised into a request."""
        return self._pool.submit(self._append, record)

    def _append(self, record: dict[str, Any]) -> None:
        try:
            self.audit.append(record)
        except OSError as exc:
            log.error("audit record for request %s could not be written: %s", record.get("request_id"), exc.strerror)

    def close(self) -> None:
        """Write every queued record, then stop the worker."""
        self._pool.shutdown(wait=True)
