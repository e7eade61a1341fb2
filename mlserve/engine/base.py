"""The engine interface the server talks to, its request and event types, and its errors.

Per-request errors (``RequestError`` and subclasses) carry the HTTP status the server
answers with; ``EngineError`` (in mlserve.errors) means the engine itself cannot serve.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlserve.errors import MlserveError


class RequestError(MlserveError):
    """A single request cannot be served; ``status`` is its HTTP status."""

    status = 400
    kind = "invalid_request_error"
    code: str | None = None


class ContextOverflow(RequestError):
    """The prompt (plus max_tokens) does not fit the context."""

    code = "context_length_exceeded"


class Overloaded(RequestError):
    """The model's queue is full, or the server is draining."""

    status = 503
    kind = "server_error"
    code = "overloaded"


class DeadlineExceeded(RequestError):
    """The request's deadline passed; generation was stopped."""

    status = 504
    kind = "server_error"
    code = "deadline_exceeded"


@dataclass(frozen=True)
class Sampling:
    """Effective sampling parameters of one request."""

    max_tokens: int
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class GenerationRequest:
    """One generation: prompt tokens in, text deltas out."""

    id: str
    prompt_tokens: list[int]
    sampling: Sampling
    max_tokens_explicit: bool = True
    deadline: float | None = None  # time.monotonic() value
    submitted_at: float = 0.0  # set by the engine when queued
    admitted_at: float = 0.0  # set by the scheduler when it gets a sequence slot


@dataclass(frozen=True)
class TokenEvent:
    """New text (possibly empty while a multibyte character or stop string is pending)."""

    text: str
    n_tokens: int


@dataclass(frozen=True)
class FinishEvent:
    """The end of a generation."""

    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # final flush of held-back text


@dataclass(frozen=True)
class ErrorEvent:
    """Generation ended with an error after it started."""

    error: RequestError


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclass
class EngineHealth:
    """Readiness of one engine."""

    ready: bool
    state: str  # loading | ready | draining | failed | stopped
    detail: str | None = None
    stats: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    """What the server needs from an engine."""

    model_id: str  # NAME:VERSION that serves

    async def start(self) -> None:
        """Load the model and warm it up (one token)."""

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary (valid prompt token ids are below it)."""

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Tokenise text for this model."""

    def chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render chat messages with the model's chat template and tokenise them."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream events for one request."""

    def abort(self, request_id: str) -> None:
        """Stop a request's generation and free its state."""

    def health(self) -> EngineHealth:
        """Current readiness, answered without waiting on the engine thread."""

    async def close(self) -> None:
        """Stop the engine and free its resources."""
