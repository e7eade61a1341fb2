"""The smoke check: load a model, generate a few tokens, close it (the ``promote --check`` gate)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from mlserve.engine.base import ErrorEvent, FinishEvent, GenerationRequest, RequestError, Sampling
from mlserve.engine.llama_engine import EngineConfig, LlamaEngine
from mlserve.errors import EngineError


@dataclass(frozen=True)
class SmokeResult:
    """What the smoke completion produced."""

    completion_tokens: int
    seconds: float


def smoke_check(config: EngineConfig, prompt: str = "The patient", max_tokens: int = 4) -> SmokeResult:
    """Start the engine, complete ``max_tokens`` tokens greedily and close; raise EngineError on any failure."""
    return asyncio.run(_smoke(config, prompt, max_tokens))


async def _smoke(config: EngineConfig, prompt: str, max_tokens: int) -> SmokeResult:
    engine = LlamaEngine(config)
    started = time.monotonic()
    try:
        await engine.start()
        request = GenerationRequest("smoke", engine.tokenize(prompt), Sampling(max_tokens=max_tokens, temperature=0))
        async for event in engine.generate(request):
            if isinstance(event, ErrorEvent):
                raise EngineError(f"The smoke completion failed: {event.error.message}")
            if isinstance(event, FinishEvent):
                if event.completion_tokens < 1:
                    raise EngineError("The smoke completion produced no tokens.")
                return SmokeResult(event.completion_tokens, time.monotonic() - started)
        raise EngineError("The smoke completion ended without finishing.")
    except RequestError as exc:
        raise EngineError(f"The smoke completion failed: {exc.message}") from exc
    finally:
        await engine.close()
