"""The llama.cpp engine: loads a bundle, runs the batching scheduler, adapts it to asyncio."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlserve.engine.base import (
    ContextOverflow,
    EngineHealth,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    RequestError,
    Sampling,
)
from mlserve.engine.chat import ChatTemplate, ChatTemplateError, checked_template
from mlserve.engine.llama_model import LlamaModel
from mlserve.engine.scheduler import Scheduler
from mlserve.errors import EngineError


@dataclass(frozen=True)
class EngineConfig:
    """How to run one model."""

    model_path: Path
    model_id: str
    ctx_size: int = 4096
    parallel: int = 8
    threads: int | None = None
    gpu_layers: int = 0
    max_queue: int = 64
    batch: int = 512
    kv_unified: bool = False
    chat_template: str | None = None
    stop: tuple[str, ...] = ()


def default_threads() -> int:
    """Physical-ish core count: all available CPUs, at least one."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


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
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        """Load the model off the event loop, start the scheduler, warm up one token."""
        self._loop = asyncio.get_running_loop()
        try:
            self._model = await asyncio.to_thread(self._load)
            self._scheduler = Scheduler(self._model, self._deliver, self.config.max_queue)
            self._scheduler.start()
            warm = GenerationRequest(
                id="warmup-" + uuid.uuid4().hex[:8],
                prompt_tokens=self._model.tokenize("Hello"),
                sampling=Sampling(max_tokens=1, temperature=0.0),
            )
            async for _ in self.generate(warm):
                pass
        except (EngineError, RequestError) as exc:
            self._state, self._detail = "failed", exc.message
            raise EngineError(f"Model {self.model_id} failed to start: {exc.message}") from exc
        self._state = "ready"

    def _load(self) -> LlamaModel:
        c = self.config
        model = LlamaModel(
            c.model_path,
            n_ctx_seq=c.ctx_size,
            n_seq=c.parallel,
            n_threads=c.threads or default_threads(),
            n_gpu_layers=c.gpu_layers,
            n_batch=c.batch,
            kv_unified=c.kv_unified,
        )
        source = c.chat_template or model.meta("tokenizer.chat_template")
        if source:
            self._template = checked_template(source, model.special_tokens())
        return model

    def begin_drain(self) -> None:
        """Report not-ready while in-flight requests finish."""
        if self._state == "ready":
            self._state = "draining"

    async def close(self) -> None:
        """Stop the scheduler thread and free llama.cpp resources."""
        self._state = "stopped"
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.stop)
        if self._model is not None:
            self._model.close()
            self._model = None

    def health(self) -> EngineHealth:
        """Readiness from plain attributes: never waits for the engine thread."""
        failed = self._scheduler.failed if self._scheduler else None
        if failed:
            self._state, self._detail = "failed", failed
        stats: dict[str, float] = {}
        if self._scheduler is not None:
            st = self._scheduler.stats
            stats = {"active": st.active, "queued": st.queued, "kv_cells_used": st.kv_cells_used}
        return EngineHealth(self._state == "ready", self._state, self._detail, stats)

    @property
    def scheduler(self) -> Scheduler | None:
        """The batching scheduler (for metrics)."""
        return self._scheduler

    @property
    def vocab_size(self) -> int:
        """Tokens in the model's vocabulary (0 before it is loaded)."""
        return self._model.n_vocab if self._model is not None else 0

    # -- requests ----------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Tokenise with the model's vocabulary (read-only, safe on the event loop)."""
        if self._model is None:
            raise EngineError(f"Model {self.model_id} is not loaded.")
        return self._model.tokenize(text, add_special=add_special, parse_special=add_special is False)

    def chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        """Render messages with the chat template and tokenise the result."""
        if self._template is None or self._model is None:
            raise ChatTemplateError(f"Model {self.model_id} has no chat template; use /v1/completions.")
        text = self._template.render(messages)
        tokens = self._model.tokenize(text, add_special=False, parse_special=True)
        bos = self._model.special_tokens()["bos_token"]
        if self._model.add_bos() and not text.startswith(bos):
            tokens = self._model.tokenize(bos, add_special=False, parse_special=True) + tokens
        return tokens

    def fit(self, request: GenerationRequest) -> GenerationRequest:
        """Check the prompt fits; clamp an implicit max_tokens to the room left."""
        n = len(request.prompt_tokens)
        room = self.config.ctx_size - n
        if n == 0:
            raise RequestError("The prompt is empty after tokenisation.")
        if room < 1:
            raise ContextOverflow(
                f"The prompt has {n} tokens but the context holds {self.config.ctx_size}; shorten the prompt."
            )
        wanted = request.sampling.max_tokens
        if wanted > room:
            if request.max_tokens_explicit:
                raise ContextOverflow(
                    f"The prompt has {n} tokens and max_tokens is {wanted}, but the context holds "
                    f"{self.config.ctx_size}; lower max_tokens to at most {room}."
                )
            from dataclasses import replace

            request.sampling = replace(request.sampling, max_tokens=room)
        return request

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream events; aborts the sequence if the consumer stops early."""
        if self._scheduler is None:
            raise EngineError(f"Model {self.model_id} is not loaded.")
        self.fit(request)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._scheduler.submit(request, queue)
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
                self._scheduler.abort(request.id)

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


def _put_all(items: list[tuple[Any, Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
