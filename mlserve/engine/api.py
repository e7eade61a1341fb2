"""The engine API: the one module the server imports from ``mlserve.engine``.

It holds the engine protocol, the request and event types, the scheduler's counters and
the per-request errors. Nothing here knows HTTP: errors say *what happened* and the
server's error table (``mlserve.server.errors``) decides the status each surface answers.

Per-request errors::

    RequestError                  one request cannot be served (the engine is fine)
    ├── InvalidRequest            the input is unusable (empty prompt, bad token id, template refusal)
    │   └── ContextOverflow       prompt (plus max_tokens) does not fit the context
    ├── Overloaded                the queue is full: try again shortly
    ├── Unavailable               not ready, draining or unloaded: try another instance
    ├── DeadlineExceeded          the deadline passed; generation was stopped
    └── GenerationFailed          llama.cpp failed this request's sequence (others go on)

``mlserve.errors.EngineError`` is different: the engine itself cannot serve (load failure,
engine thread dead), and ``health().state`` says so ("failed" or "dead").
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from mlserve.errors import MlserveError

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # tokens per llama_decode, for the histogram
EMBED_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # inputs per embeddings llama_decode, for the histogram


class RequestError(MlserveError):
    """A single request cannot be served; the engine itself is fine."""


class InvalidRequest(RequestError):
    """The request's input cannot be used (the client must change it)."""


class ContextOverflow(InvalidRequest):
    """The prompt (plus max_tokens) does not fit the context."""


class Overloaded(RequestError):
    """The model's queue is full; the same request may succeed shortly."""


class Unavailable(RequestError):
    """The model is not ready, is draining, or was unloaded; send the request elsewhere."""


class DeadlineExceeded(RequestError):
    """The request's deadline passed; generation was stopped."""


class GenerationFailed(RequestError):
    """llama.cpp failed this request's sequence; other sequences carry on."""


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
    # GBNF text (from ``Engine.schema_grammar``): every sampled token must keep the output inside it.
    grammar: str | None = None


@dataclass
class GenerationRequest:
    """One generation: prompt tokens in, text deltas out."""

    id: str
    prompt_tokens: list[int]
    sampling: Sampling
    max_tokens_explicit: bool = True
    deadline: float | None = None  # time.monotonic() value
    # Decoded alone: no other sequence in its llama_decode calls, no prefix reuse, fixed prompt
    # chunks, so the same greedy (or seeded) request gives the same bytes under any load.
    deterministic: bool = False
    # Prompt-lookup drafts may be verified for it (when the model is served with speculation; never
    # for deterministic or grammar-constrained requests); False: the request opted out.
    speculate: bool = True
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
    stop: str | None = None  # the stop string that ended it (None: an end-of-generation token, or "length")


@dataclass(frozen=True)
class ErrorEvent:
    """Generation ended with an error after it started."""

    error: RequestError


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclass
class StepStats:
    """A scheduler's counters, read by the metrics endpoint (plain ints: reads need no lock)."""

    active: int = 0
    queued: int = 0
    last_batch_tokens: int = 0
    kv_cells_used: int = 0
    steps: int = 0
    batch_tokens_total: int = 0
    # batch_hist[i]: steps whose batch had at most BATCH_BUCKETS[i] tokens (last slot: more)
    batch_hist: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BUCKETS) + 1))
    prefix_hits: int = 0
    prefix_tokens_reused: int = 0
    decode_retries: int = 0  # llama_decode calls retried with a smaller batch (no KV slot)
    sequences_failed: int = 0  # sequences failed by a llama_decode error while the engine lived on
    # Prompt-lookup speculation: drafted tokens verified, those the model accepted, and the
    # verifications (steps of one sequence with at least one draft).
    draft_tokens: int = 0
    draft_accepted: int = 0
    draft_verifications: int = 0
    # Embeddings (``serve --embeddings``), written by the embeddings thread: llama_decode calls, the
    # inputs they held, and embed_hist[i]: calls with at most EMBED_BUCKETS[i] inputs (last slot: more).
    embed_decodes: int = 0
    embed_inputs: int = 0
    embed_hist: list[int] = field(default_factory=lambda: [0] * (len(EMBED_BUCKETS) + 1))


@dataclass
class EngineHealth:
    """Readiness of one engine.

    ``state``: loading | ready | draining | failed (never loaded) | dead (its thread is gone:
    liveness must fail so an orchestrator restarts the process) | stopped.
    """

    ready: bool
    state: str
    detail: str | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        """False once the engine can never serve again without a restart."""
        return self.state != "dead"


class Engine(Protocol):
    """What the server needs from an engine; every call is safe on the event loop."""

    model_id: str  # NAME:VERSION that serves

    async def start(self) -> None:
        """Load the model and warm it up; raise EngineError when it cannot serve."""

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary (valid prompt token ids are below it)."""

    async def tokenize(self, text: str) -> list[int]:
        """Tokenise client text (no special-token parsing), off the event loop."""

    async def chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render messages with the model's chat template and tokenise them, off the event loop."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream events for one request; raise RequestError before the first event when refused."""

    async def schema_grammar(self, schema: dict[str, Any]) -> str:
        """The grammar (``Sampling.grammar``) that enforces a JSON Schema; InvalidRequest naming what it cannot."""

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalised vectors for ``texts`` (decoded together) and their total tokens.

        InvalidRequest when the model is not served with embeddings; ContextOverflow for an input
        longer than the embeddings context (never cut).
        """

    def abort(self, request_id: str) -> None:
        """Stop a request's generation and free its state."""

    def health(self) -> EngineHealth:
        """Current readiness, answered without waiting on the engine thread."""

    def stats(self) -> StepStats | None:
        """The scheduler's counters (None before the model is loaded)."""

    def begin_drain(self) -> None:
        """Report not-ready while in-flight requests finish."""

    async def close(self) -> None:
        """Stop the engine and free its resources."""
