"""API keys, scopes and rate limits: who may call a route, read from the route registry.

Scopes: ``infer`` for inference and model listing, ``metrics`` for ``/metrics``, ``admin``
covers all. ``open`` routes (liveness and readiness probes) need no key, so orchestrators can
probe. A path no surface declares needs a valid key of any scope (then answers 404).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from starlette.datastructures import Headers

from mlserve.security.audit import AuditLog
from mlserve.security.keys import KeyRecord, KeyRing
from mlserve.server.errors import Forbidden, RateLimited, Unauthorized
from mlserve.server.ratelimit import RateLimiter
from mlserve.server.registry import RouteSpec
from mlserve.server.settings import ServerSettings


@dataclass
class Guard:
    """What the security layer holds for one app: keys, rate limiter, audit log, content logging."""

    keys: KeyRing
    limiter: RateLimiter
    audit: AuditLog | None = None
    log_content: bool = False


def build_guard(settings: ServerSettings) -> Guard:
    """The guard for these settings: reads the key file now and opens the audit log."""
    keys = KeyRing(Path(settings.keys_file) if settings.keys_file else None)
    audit = AuditLog(Path(settings.audit_dir)) if settings.audit_dir else None
    return Guard(keys, RateLimiter(settings.rate_limit), audit, settings.log_content)


def presented_key(headers: Headers) -> str | None:
    """``Authorization: Bearer KEY`` or ``x-api-key: KEY`` (Anthropic's and Azure's header)."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key") or None


def identify(guard: Guard, spec: RouteSpec | None, headers: Headers) -> KeyRecord | None:
    """The key presented for ``spec`` (None on a keyless server or an open route); Unauthorized without one."""
    if spec is not None and spec.scope == "open":
        return None
    keys = guard.keys
    keys.refresh()
    if not keys.enabled:
        return None
    given = presented_key(headers)
    record = keys.authenticate(given) if given else None
    if record is None:
        raise Unauthorized("A valid API key is required: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'.")
    return record


def authorize(guard: Guard, spec: RouteSpec | None, record: KeyRecord | None) -> None:
    """Refuse a key that lacks the route's scope (Forbidden) or is over its rate (RateLimited).

    A keyless server is loopback-only (serve refuses otherwise) and is not throttled, so a
    gateway that forwards a whole ward's requests from one address is never surprised.
    """
    if record is None:
        return
    if spec is not None and not record.allows(spec.scope):
        raise Forbidden(f"This API key lacks the '{spec.scope}' scope needed here.")
    wait = guard.limiter.check(f"key:{record.name}")
    if wait is not None:
        raise RateLimited("Rate limit exceeded; retry later.", wait)
