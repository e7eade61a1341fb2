"""Per-request accounting: metrics, in-flight counts, the audit record and the one log line."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.requests import Request

from mlserve.engine.base import FinishEvent, GenerationRequest
from mlserve.server.auditing import RequestAudit
from mlserve.server.state import ServedModel, ServerState

log = logging.getLogger("mlserve.server")
_RID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id(request: Request) -> str:
    """The client's ``x-request-id`` when it is a plain token, else a fresh one."""
    given = request.headers.get("x-request-id", "")
    return given if _RID.fullmatch(given) else "req-" + uuid.uuid4().hex


class Tracker:
    """Metrics, in-flight count and the one log line of a request (no text, ever)."""

    def __init__(
        self,
        state: ServerState,
        model: ServedModel,
        route: str,
        rid: str,
        started: float,
        req: GenerationRequest,
        audit: RequestAudit | None = None,
    ) -> None:
        self.state, self.model, self.route, self.rid, self.started, self.req = state, model, route, rid, started, req
        self.audit = audit
        self.first_at: float | None = None
        self.done = False  # in-flight counts were raised when the request was routed
        if req.admitted_at:
            state.metrics.queue_wait.labels(model.id).observe(max(0.0, req.admitted_at - req.submitted_at))

    def token(self) -> None:
        """Note the first token (time to first token)."""
        if self.first_at is None:
            self.first_at = time.monotonic()
            self.state.metrics.ttft.labels(self.model.id).observe(self.first_at - self.started)

    def finish(self, status: int, fin: FinishEvent | None) -> None:
        """Settle the request once: counters, log line, audit record."""
        if self.done:
            return
        self.done = True
        m = self.state.metrics
        mid = self.model.id
        self.state.in_flight -= 1
        self.model.in_flight -= 1
        m.in_flight.labels(mid).dec()
        m.requests.labels(mid, self.route, str(status)).inc()
        elapsed = time.monotonic() - self.started
        m.duration.labels(mid).observe(elapsed)
        if fin is not None:
            m.prompt_tokens.labels(mid).inc(fin.prompt_tokens)
            m.generation_tokens.labels(mid).inc(fin.completion_tokens)
        log.info(
            "request %s %s model=%s status=%d prompt_tokens=%s completion_tokens=%s seconds=%.3f",
            self.rid,
            self.route,
            mid,
            status,
            fin.prompt_tokens if fin else "-",
            fin.completion_tokens if fin else "-",
            elapsed,
        )
        if self.audit is not None:
            self.audit.finish(status, self.model, self.req.sampling, fin)
