"""The server's one error table: every exception a request can end in, mapped to an HTTP outcome.

Routes and the inference service only raise; the context middleware (``context.py``) asks
``outcome_of`` what the exception means and has the route's surface render it in its own
shape (OpenAI's ``{"error": {...}}``, Ollama's ``{"error": "..."}``, ...). Engine errors carry
no HTTP status: this table is the only place that gives them one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from mlserve.engine.api import (
    ContextOverflow,
    DeadlineExceeded,
    GenerationFailed,
    InvalidRequest,
    Overloaded,
    RequestError,
    Unavailable,
)
from mlserve.errors import EngineError, InvalidInputError, MlserveError, NotFoundError

log = logging.getLogger("mlserve.server")


class HttpRefusal(MlserveError):
    """A refusal that only exists at the HTTP layer (size, keys, scopes, rate, client gone)."""


class BodyTooLarge(HttpRefusal):
    """The request body exceeds the server's limit."""


class BadBody(HttpRefusal):
    """The body is not JSON, not an object, nested too deeply, or fails the surface's schema."""


class Unauthorized(HttpRefusal):
    """No valid API key was presented."""


class Forbidden(HttpRefusal):
    """The API key lacks the scope the route needs."""


class RateLimited(HttpRefusal):
    """The API key sent too many requests; ``retry_after`` seconds until the next is allowed."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ClientGone(HttpRefusal):
    """The client disconnected before the answer began."""


@dataclass(frozen=True)
class Outcome:
    """What an exception means over HTTP, before a surface gives it its shape."""

    status: int
    kind: str  # OpenAI-style error type: invalid_request_error, server_error, ...
    code: str | None
    message: str
    retry_after: int | None = None


# (exception class, status, kind, code, retryable): the first match wins, so subclasses come first.
_TABLE: tuple[tuple[type[BaseException], int, str, str | None, bool], ...] = (
    (ContextOverflow, 400, "invalid_request_error", "context_length_exceeded", False),
    (InvalidRequest, 400, "invalid_request_error", None, False),
    (BadBody, 400, "invalid_request_error", None, False),
    (BodyTooLarge, 413, "invalid_request_error", "body_too_large", False),
    (Unauthorized, 401, "authentication_error", "invalid_api_key", False),
    (Forbidden, 403, "permission_error", "insufficient_scope", False),
    (RateLimited, 429, "rate_limit_error", "rate_limit_exceeded", False),
    (NotFoundError, 404, "invalid_request_error", "model_not_found", False),
    (ClientGone, 499, "invalid_request_error", "client_closed_request", False),
    (ClientDisconnect, 499, "invalid_request_error", "client_closed_request", False),
    (Overloaded, 503, "server_error", "overloaded", True),
    (Unavailable, 503, "server_error", "unavailable", True),
    (GenerationFailed, 503, "server_error", "generation_failed", True),
    (DeadlineExceeded, 504, "server_error", "deadline_exceeded", False),
    (RequestError, 400, "invalid_request_error", None, False),
    (EngineError, 503, "server_error", "engine_unavailable", True),
    (InvalidInputError, 400, "invalid_request_error", None, False),
    (MlserveError, 400, "invalid_request_error", None, False),
)


def outcome_of(exc: BaseException, retry_after: int = 1) -> Outcome:
    """The HTTP outcome of ``exc``; anything unexpected is a 500 whose message names nothing internal."""
    for cls, status, kind, code, retryable in _TABLE:
        if isinstance(exc, cls):
            wait = exc.retry_after if isinstance(exc, RateLimited) else (retry_after if retryable else None)
            message = exc.message if isinstance(exc, MlserveError) else "The client disconnected."
            return Outcome(status, kind, code, message, wait)
    if isinstance(exc, HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return Outcome(exc.status_code, kind, None, str(exc.detail))
    # The type only: a message may quote request text. The traceback only at --log-level debug.
    log.error("internal error: %s", type(exc).__name__)
    log.debug("internal error traceback", exc_info=exc)
    return Outcome(500, "server_error", None, "Internal server error.")


def render_openai(outcome: Outcome) -> Response:
    """OpenAI's error shape, ``{"error": {"message", "type", "code"}}``: the default for every route."""
    body = {"error": {"message": outcome.message, "type": outcome.kind, "code": outcome.code}}
    return JSONResponse(body, status_code=outcome.status)
