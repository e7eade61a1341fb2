"""The llama.cpp engine: loads a bundle, runs the batching scheduler, adapts it to asyncio.

It implements ``mlserve.engine.api.Engine``. Tokenising and chat templating run in worker
threads (a 4 MiB prompt takes a while); the vocabulary they read is freed only once none
of them still uses it. A JSON Schema becomes a grammar in a worker thread too (checked,
converted, compiled as a trial), before the request is queued, so a schema the grammar
cannot enforce is refused before anything runs. With ``serve --embeddings`` a second llama.cpp
context on the same weights, owned by its own thread (``EmbedWorker``), answers ``embed``:
generation never waits for an embeddings decode's context, nor the other way round.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from mlserve.engine.api import (
    ContextOverflow,
    EngineHealth,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    InvalidRequest,
    RequestError,
    Sampling,
    StepStats,
    Unavailable,
)
from mlserve.engine.chat import ChatTemplate, ChatTemplateError, checked_template
from mlserve.engine.embedding import EmbedWorker
from mlserve.engine.llama.config import EngineConfig, default_threads, load_model
from mlserve.engine.llama.embed_context import EmbeddingContext
from mlserve.engine.llama.grammar import schema_to_gbnf
from mlserve.engine.llama.model import LlamaModel
from mlserve.engine.scheduler import Scheduler
from mlserve.engine.schema import check_schema
from mlserve.errors import EngineError

__all__ = ["EngineConfig", "LlamaEngine", "default_threads"]

INLINE_TOKENIZE_CHARS = 4096  # shorter text tokenises in well under a millisecond: not worth a thread hop
EMBED_SEQS = 64  # inputs one embeddings decode may hold


class LlamaEngine:
    """Engine over llama.cpp with continuous batching across ``parallel`` sequences."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_id = config.model_id
        self._state = "loading"
        self._detail: str | None = None
        self._model: LlamaModel | None = None
        self._scheduler: Scheduler | None = None
        self._template: ChatTemplate | None = None
        self._embedder: EmbedWorker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._users = 0  # worker threads reading the vocabulary
        self._users_cv = threading.Condition()

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        """Validate and load the model off the event loop, start the scheduler, warm up one token."""
        self._loop = asyncio.get_running_loop()
        try:
            self._model = await asyncio.to_thread(self._load)
            self._scheduler = Scheduler(self._model, self._deliver, self.config.max_queue, self.config.tuning)
            self._scheduler.start()
            await self._warm_up(self._model)
            if self.config.embeddings:
                self._embedder = await asyncio.to_thread(self._open_embeddings, self._model, self._scheduler.stats)
                await self.embed(["Hello"])  # warm: the first decode allocates its buffers
        except (EngineError, RequestError) as exc:
            await self._release()
            self._state, self._detail = "failed", exc.message
            raise EngineError(f"Model {self.model_id} failed to start: {exc.message}", exc.hint) from exc
        self._state = "ready"

    def _load(self) -> LlamaModel:
        model = load_model(self.config)
        try:
            source = self.config.chat_template or model.meta("tokenizer.chat_template")
            if source:
                self._template = checked_template(source, model.special_tokens())
        except BaseException:
            model.close()
            raise
        return model

    def _open_embeddings(self, model: LlamaModel, stats: StepStats) -> EmbedWorker:
        threads = self.config.threads or default_threads()
        context = EmbeddingContext(model, n_ctx=self.config.embeddings_ctx, n_seq=EMBED_SEQS, n_threads=threads)
        worker = EmbedWorker(context, stats)
        worker.start()
        return worker

    async def _warm_up(self, model: LlamaModel) -> None:
        warm = GenerationRequest(
            id="warmup-" + uuid.uuid4().hex[:8],
            prompt_tokens=model.tokenize("Hello"),
            sampling=Sampling(max_tokens=1, temperature=0.0),
        )
        async for event in self.generate(warm):
            if isinstance(event, ErrorEvent):
                raise EngineError(f"The warm-up generation failed: {event.error.message}")
            if isinstance(event, FinishEvent):
                return
        raise EngineError("The warm-up generation ended without finishing.")

    def begin_drain(self) -> None:
        """Report not-ready and refuse new requests while in-flight requests finish."""
        if self._state == "ready":
            self._state = "draining"

    async def close(self) -> None:
        """Stop the scheduler thread and free llama.cpp resources."""
        self._state = "stopped"
        await self._release()

    async def _release(self) -> None:
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.stop)
        embedder, self._embedder = self._embedder, None
        if embedder is not None:
            await asyncio.to_thread(_close_embedder, embedder)
        model, self._model = self._model, None
        if model is not None:
            await asyncio.to_thread(self._close_model, model)

    def _close_model(self, model: LlamaModel) -> None:
        with self._users_cv:  # a worker thread may still be tokenising with this vocabulary
            self._users_cv.wait_for(lambda: self._users == 0)
        model.close()

    def health(self) -> EngineHealth:
        """Readiness from plain attributes: never waits for the engine thread."""
        sched = self._scheduler
        if sched is not None and self._state in ("ready", "draining") and not sched.alive:
            # The thread is gone: this process can never serve this model again.
            self._state = "dead"
            self._detail = sched.failed or "The engine thread stopped."
        stats: dict[str, float] = {}
        if sched is not None:
            st = sched.stats
            stats = {"active": st.active, "queued": st.queued, "kv_cells_used": st.kv_cells_used}
        return EngineHealth(self._state == "ready", self._state, self._detail, stats)

    def stats(self) -> StepStats | None:
        """The scheduler's counters (None before the model is loaded)."""
        return self._scheduler.stats if self._scheduler is not None else None

    @property
    def vocab_size(self) -> int:
        """Tokens in the model's vocabulary (0 before it is loaded)."""
        return self._model.n_vocab if self._model is not None else 0

    # -- tokens ------------------------------------------------------------------
    @contextmanager
    def _vocab(self) -> Iterator[LlamaModel]:
        """The loaded model, kept alive (not closed) until the block ends."""
        with self._users_cv:
            model = self._model
            if model is None or self._state in ("stopped", "failed", "dead"):
                raise Unavailable(f"Model {self.model_id} is not loaded.")
            self._users += 1
        try:
            yield model
        finally:
            with self._users_cv:
                self._users -= 1
                self._users_cv.notify_all()

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        with self._vocab() as model:
            return model.tokenize(text, add_special=add_special, parse_special=False)

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Tokenise client text: BOS added, control-token text kept as plain text; off the loop when long."""
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return self._tokenize(text, add_special)
        return await asyncio.to_thread(self._tokenize, text, add_special)

    async def chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render messages with the chat template and tokenise them in a worker thread."""
        return await asyncio.to_thread(self._chat_tokens, messages)

    def _chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        template = self._template
        if template is None:
            raise ChatTemplateError(f"Model {self.model_id} has no chat template; use /v1/completions.")
        parts = template.render_parts(messages)
        text = "".join(part for part, _ in parts)
        with self._vocab() as model:
            if self.config.parse_special_content:
                tokens = model.tokenize(text, add_special=False, parse_special=True)
            else:
                tokens = model.tokenize_parts(parts)
            bos = model.special_tokens()["bos_token"]
            if model.add_bos() and not text.startswith(bos):
                tokens = model.tokenize(bos, add_special=False, parse_special=True) + tokens
        return tokens

    # -- structured output and embeddings ------------------------------------------
    async def schema_grammar(self, schema: dict[str, Any]) -> str:
        """Check, convert and compile a JSON Schema in a worker thread: its GBNF, or InvalidRequest."""
        return await asyncio.to_thread(self._schema_grammar, schema)

    def _schema_grammar(self, schema: dict[str, Any]) -> str:
        text = schema_to_gbnf(check_schema(schema))
        with self._vocab() as model:
            model.check_grammar(text)
        return text

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Unit vectors for ``texts``, decoded together on the embeddings thread, and their token count."""
        worker = self._embedder
        if not self.config.embeddings:
            raise InvalidRequest(
                f"Model {self.model_id} is not served with embeddings; "
                "start the server with `mlserve serve --embeddings`."
            )
        if worker is None or self._state not in ("loading", "ready"):
            raise Unavailable(f"Model {self.model_id} is {self._state_words()}; send the request elsewhere.")
        inputs = await asyncio.to_thread(self._embed_tokens, texts)
        vectors = await asyncio.wrap_future(worker.submit(inputs))
        return vectors, sum(len(tokens) for tokens in inputs)

    def _embed_tokens(self, texts: list[str]) -> list[list[int]]:
        limit = self.config.embeddings_ctx
        inputs = []
        with self._vocab() as model:
            for i, text in enumerate(texts):
                tokens = model.tokenize(text, add_special=True, parse_special=False)
                if not tokens:
                    raise InvalidRequest(f"Input {i} is empty after tokenisation.")
                if len(tokens) > limit:
                    raise ContextOverflow(
                        f"Input {i} has {len(tokens)} tokens but the embeddings context holds {limit}; "
                        "shorten it, or serve with a larger --embeddings-ctx."
                    )
                inputs.append(tokens)
        return inputs

    # -- requests ----------------------------------------------------------------
    def fit(self, request: GenerationRequest) -> GenerationRequest:
        """Check the prompt is usable and fits; clamp an implicit max_tokens to the room left."""
        tokens = request.prompt_tokens
        n = len(tokens)
        room = self.config.ctx_size - n
        if n == 0:
            raise InvalidRequest("The prompt is empty after tokenisation.")
        if room < 1:
            raise ContextOverflow(
                f"The prompt has {n} tokens but the context holds {self.config.ctx_size}; shorten the prompt."
            )
        # After the length check: min/max over at most ctx_size ids is cheap on the event loop.
        if min(tokens) < 0 or max(tokens) >= self.vocab_size:
            raise InvalidRequest(f"The prompt holds a token id outside the vocabulary (0 to {self.vocab_size - 1}).")
        wanted = request.sampling.max_tokens
        if wanted > room:
            if request.max_tokens_explicit:
                raise ContextOverflow(
                    f"The prompt has {n} tokens and max_tokens is {wanted}, but the context holds "
                    f"{self.config.ctx_size}; lower max_tokens to at most {room}."
                )
            request.sampling = replace(request.sampling, max_tokens=room)
        return request

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream events; aborts the sequence if the consumer stops early."""
        scheduler = self._scheduler
        if scheduler is None or self._state not in ("loading", "ready"):
            raise Unavailable(f"Model {self.model_id} is {self._state_words()}; send the request elsewhere.")
        self.fit(request)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        scheduler.submit(request, queue)
        finished = False
        try:
            while True:
                event = await queue.get()
                if isinstance(event, (FinishEvent, ErrorEvent)):
                    finished = True
                yield event
                if finished:
                    return
        finally:
            if not finished:
                scheduler.abort(request.id)

    def _state_words(self) -> str:
        return {"draining": "draining", "stopped": "unloaded", "dead": "dead"}.get(self._state, "not loaded")

    def abort(self, request_id: str) -> None:
        """Stop a request's generation before the next step."""
        if self._scheduler is not None:
            self._scheduler.abort(request_id)

    def _deliver(self, items: list[tuple[Any, Event]]) -> None:
        """Called on the engine thread: hand a step's events to the event loop at once."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # loop closed between the check and the call
            pass


def _close_embedder(worker: EmbedWorker) -> None:
    worker.stop()
    worker.context.close()


def _put_all(items: list[tuple[Any, Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
