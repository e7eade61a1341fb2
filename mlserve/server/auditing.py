"""Audit record pieces (prompt hash, sampling) and the writer that appends records off the event loop.

A record holds who (key name, client address), what (route, model name, version, digest,
effective sampling parameters, token counts), the outcome (status, latency) and the sha256 of
the prompt as received; stop strings are counted, not recorded, since they are client text.
Never any text.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
from typing import Any

from mlserve.engine.api import Sampling
from mlserve.names import canonical_text
from mlserve.security.audit import AuditLog

log = logging.getLogger("mlserve.server")


def prompt_sha256(value: Any) -> str | None:
    """sha256 hex of the prompt as received: the text, or the canonical JSON of messages or token ids."""
    if value is None:
        return None
    data = value if isinstance(value, str) else canonical_text(value)
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()


def sampling_record(s: Sampling | None) -> dict[str, Any] | None:
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
