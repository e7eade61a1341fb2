"""The smoke check: load a model, generate a few tokens, close it (the ``promote --check`` gate)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from mlserve.bundles.store import Bundle, Store
from mlserve.engine.api import ErrorEvent, FinishEvent, GenerationRequest, RequestError, Sampling
from mlserve.engine.llama.factory import EngineConfig, Overrides, create_engine, engine_config
from mlserve.errors import EngineError

SMOKE_CTX = 512  # enough for the prompt and a few tokens; keeps the check's memory small


@dataclass(frozen=True)
class SmokeResult:
    """What the smoke completion produced."""

    completion_tokens: int
    seconds: float


def smoke_config(store: Store, bundle: Bundle) -> EngineConfig:
    """The bundle's serving config, shrunk to one sequence of at most SMOKE_CTX cells."""
    ctx = min(engine_config(store, bundle).ctx_size, SMOKE_CTX)
    return engine_config(store, bundle, Overrides(ctx_size=ctx, parallel=1, max_queue=1))


def smoke_bundle(store: Store, bundle: Bundle) -> SmokeResult:
    """Smoke-check a stored bundle as it would be served; raise EngineError on any failure."""
    return smoke_check(smoke_config(store, bundle))


def smoke_check(config: EngineConfig, prompt: str = "The patient", max_tokens: int = 4) -> SmokeResult:
    """Start the engine, complete ``max_tokens`` tokens greedily and close; raise EngineError on any failure."""
    return asyncio.run(_smoke(config, prompt, max_tokens))


async def _smoke(config: EngineConfig, prompt: str, max_tokens: int) -> SmokeResult:
    engine = create_engine(config)
    started = time.monotonic()
    try:
        await engine.start()
        tokens = await engine.tokenize(prompt)
        request = GenerationRequest("smoke", tokens, Sampling(max_tokens=max_tokens, temperature=0))
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
