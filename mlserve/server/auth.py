"""API-key authentication, scopes and rate limiting, as plain ASGI middleware (streaming untouched).

Scopes: ``infer`` for ``/v1/*`` and ``/v2/models/*/ready``; ``metrics`` for ``/metrics``;
``admin`` covers all. Liveness and readiness stay open so orchestrators can probe.
Other paths need a valid key of any scope (then answer 404).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mlserve.audit import AuditLog
from mlserve.keys import KeyRing
from mlserve.server.auditing import INFERENCE_ROUTES, RequestAudit
from mlserve.server.ratelimit import RateLimiter
from mlserve.server.state import ServerSettings
from mlserve.server.tracking import request_id

log = logging.getLogger("mlserve.server")
OPEN_PATHS = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})


@dataclass
class Guard:
    """What the security layer holds for one app: keys, rate limiter, audit writer, content logging."""

    keys: KeyRing
    limiter: RateLimiter
    audit: AuditLog | None = None
    log_content: bool = False


def required_scope(path: str) -> str | None:
    """The scope a path needs; None: any valid key."""
    if path.startswith("/v1/") or (path.startswith("/v2/models/") and path.endswith("/ready")):
        return "infer"
    if path == "/metrics":
        return "metrics"
    return None


def presented_key(headers: Headers) -> str | None:
    """``Authorization: Bearer KEY`` or ``x-api-key: KEY``."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key") or None


class AuthMiddleware:
    """Refuses with 401/403/429 in OpenAI's error shape; passes the key name on in ``scope``."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        keys = self.guard.keys
        keys.refresh()
        name: str | None = None
        if keys.enabled:
            given = presented_key(headers)
            record = keys.authenticate(given) if given else None
            if record is None:
                message = "A valid API key is required: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'."
                refusal = _error(401, message, "authentication_error", "invalid_api_key")
                refusal.headers["WWW-Authenticate"] = "Bearer"
                await self._refuse(scope, receive, send, refusal)
                return
            needed = required_scope(path)
            scope["mlserve.key"] = record.name
            if needed is not None and not record.allows(needed):
                message = f"This API key lacks the '{needed}' scope needed here."
                await self._refuse(scope, receive, send, _error(403, message, "permission_error", "insufficient_scope"))
                return
            name = record.name
        # The limit is per API key; a keyless (loopback-only) server does not throttle, so a
        # gateway that forwards a whole ward's requests from one address is never surprised.
        wait = self.guard.limiter.check(f"key:{name}") if name else None
        if wait is not None:
            refusal = _error(429, "Rate limit exceeded; retry later.", "rate_limit_error", "rate_limit_exceeded")
            refusal.headers["Retry-After"] = str(wait)
            scope["mlserve.key"] = name
            await self._refuse(scope, receive, send, refusal)
            return
        scope["mlserve.key"] = name
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, response: JSONResponse) -> None:
        path = scope.get("path", "")
        if path in INFERENCE_ROUTES and scope.get("method") == "POST":
            rid = request_id(Request(scope))
            response.headers["x-request-id"] = rid
            RequestAudit(scope, rid, path).finish(response.status_code)
            app = scope.get("app")
            state = getattr(app.state, "mlserve", None) if app is not None else None
            if state is not None:
                state.metrics.requests.labels("", path, str(response.status_code)).inc()
            log.info("request %s %s status=%d", rid, path, response.status_code)
        await response(scope, receive, send)


def _error(status: int, message: str, kind: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def build_guard(settings: ServerSettings) -> Guard:
    """The guard for these settings: reads the key file now and opens the audit log."""
    keys = KeyRing(Path(settings.keys_file) if settings.keys_file else None)
    audit = AuditLog(Path(settings.audit_dir)) if settings.audit_dir else None
    return Guard(keys, RateLimiter(settings.rate_limit), audit, settings.log_content)
