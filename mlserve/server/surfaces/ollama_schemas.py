"""Request bodies of the Ollama surface, validated at the boundary, and their mapping to the neutral service.

Every field and option Ollama defines is declared, so a refusal can name it. An option is
honoured, accepted at the one value that leaves it off, ignored because it only tunes how the
server runs the model, or refused with 400; never silently dropped.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mlserve.engine.api import InvalidRequest
from mlserve.server.service import Params
from mlserve.server.surfaces.common import MlserveOptions, StopStrings, speculates

# The look-back of mlserve's repeat/frequency/presence penalties (PENALTY_LAST_N in the llama.cpp
# engine), which is also Ollama's default repeat_last_n: that one value is accepted.
PENALTY_LAST_N = 64

# Options that only tune how the server runs the model (threads, GPU split, memory mapping, batch
# size) or what it keeps on a context shift mlserve never performs: the operator sets those on
# `mlserve serve`, and they cannot change what is generated, so they are accepted and ignored.
IGNORED_OPTIONS = (
    "num_keep",
    "num_batch",
    "num_thread",
    "num_gpu",
    "main_gpu",
    "low_vram",
    "use_mmap",
    "use_mlock",
    "numa",
    "mirostat_tau",  # only read when mirostat is on, and mirostat is only accepted off
    "mirostat_eta",
)
# Sampler features mlserve does not implement: accepted only at the value that turns them off.
NEUTRAL_OPTIONS: dict[str, Any] = {
    "typical_p": 1.0,
    "tfs_z": 1.0,
    "mirostat": 0,
    "penalize_newline": False,
    "repeat_last_n": PENALTY_LAST_N,
}


class _Body(BaseModel):
    # Unknown fields are refused: an option we silently ignored would be a lie.
    model_config = ConfigDict(extra="forbid")


class Options(_Body):
    """Ollama's ``options``: sampling honoured, run-time tuning ignored, the rest refused unless off."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_k: int | None = Field(None, ge=0, le=1000)
    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-1, le=2**63 - 1)  # -1: a random seed, as in Ollama
    num_predict: int | None = Field(None, ge=-2)  # -1 (no limit) and -2 (fill the context): the model's default
    stop: StopStrings | None = None
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    num_ctx: int | None = Field(None, ge=1)
    typical_p: float | None = None
    tfs_z: float | None = None
    mirostat: int | None = None
    penalize_newline: bool | None = None
    repeat_last_n: int | None = None
    num_keep: int | None = None
    num_batch: int | None = None
    num_thread: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    numa: bool | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    embedding_only: bool | None = None

    def check_context(self, ctx_size: int | None) -> None:
        """Refuse a ``num_ctx`` larger than the context each sequence is served with."""
        if self.num_ctx is not None and ctx_size is not None and self.num_ctx > ctx_size:
            raise InvalidRequest(
                f"options.num_ctx is {self.num_ctx}, but this server gives each sequence {ctx_size} tokens of "
                f"context; ask for at most {ctx_size} (the operator sets it with `mlserve serve --ctx-size`)."
            )

    def check(self, ctx_size: int | None) -> None:
        """Refuse options mlserve cannot honour for a generation (naming them) and a too large ``num_ctx``."""
        self.check_context(ctx_size)
        for name, off in NEUTRAL_OPTIONS.items():
            value = getattr(self, name)
            if value is not None and value != off:
                raise InvalidRequest(
                    f"Option '{name}' is not supported by mlserve; omit it or send {_json(off)}, which turns it off."
                )
        for name in ("f16_kv", "logits_all", "vocab_only", "embedding_only"):
            if getattr(self, name) is not None:
                raise InvalidRequest(f"Option '{name}' is not supported by mlserve; omit it.")

    def params(self, json_schema: dict[str, Any] | None, deterministic: bool) -> Params:
        """The neutral service's sampling parameters."""
        n = self.num_predict
        return Params(
            max_tokens=n if n is not None and n > 0 else None,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=None if self.seed is None or self.seed < 0 else self.seed,
            stop=tuple(self.stop or ()),
            json_schema=json_schema,
            deterministic=deterministic,
        )


def _json(value: Any) -> str:
    return "false" if value is False else "true" if value is True else str(value)


class _Generating(_Body):
    """What /api/chat and /api/generate share."""

    model: str = Field(min_length=1, max_length=200)
    stream: bool = True  # Ollama streams unless told not to
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: float | str | None = None  # accepted: models stay loaded while the server runs
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    mlserve: MlserveOptions | None = None  # mlserve's own options, e.g. {"deterministic": true}

    def refuse_unsupported(self) -> None:
        """400 naming a feature the request asks for that mlserve does not provide."""
        if self.think:
            raise InvalidRequest("'think' is not supported by mlserve; omit it or send false.")
        if self.logprobs:
            raise InvalidRequest("'logprobs' is not supported by mlserve; omit it or send false.")
        if self.top_logprobs:
            raise InvalidRequest("'top_logprobs' is not supported by mlserve; omit it or send 0.")

    def json_schema(self) -> dict[str, Any] | None:
        """``format``: "json" is any JSON object, a dict is a JSON Schema, "" or none is free text."""
        if self.format == "json":
            return {"type": "object"}
        return self.format or None

    def params(self, ctx_size: int | None) -> Params:
        """Checked options and format as the neutral service's parameters."""
        self.refuse_unsupported()
        options = self.options or Options()
        options.check(ctx_size)
        params = options.params(self.json_schema(), bool(self.mlserve and self.mlserve.deterministic))
        return replace(params, speculate=speculates(self.mlserve))

    def unloading(self) -> bool:
        """``keep_alive: 0`` with nothing to generate: Ollama's way to unload a model."""
        return self.keep_alive in (0, "0", "0s", "0m")


class ChatMessage(_Body):
    """One Ollama chat message (text only)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[Any] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class ChatRequest(_Generating):
    """POST /api/chat."""

    messages: list[ChatMessage] = Field(default_factory=list)  # none: only load the model
    tools: list[Any] | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template expects them; 400 for what mlserve cannot render."""
        if self.tools:
            raise InvalidRequest("'tools' is not supported by mlserve; send the request without tools.")
        out = []
        for i, m in enumerate(self.messages):
            if m.role == "tool" or m.tool_calls or m.tool_name:
                raise InvalidRequest(f"messages.{i}: tool calls and tool results are not supported by mlserve.")
            if m.images:
                raise InvalidRequest(f"messages.{i}.images: images are not supported by mlserve (text models only).")
            if m.thinking:
                raise InvalidRequest(f"messages.{i}.thinking is not supported by mlserve; omit it.")
            out.append({"role": m.role, "content": m.content})
        if out and out[-1]["role"] == "assistant":
            raise InvalidRequest(
                "The last message is from the assistant; continuing a partial reply is not supported by mlserve. "
                "End the conversation with a user message."
            )
        return out


class GenerateRequest(_Generating):
    """POST /api/generate."""

    prompt: str | None = None  # none or empty: only load the model
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None

    def refuse_unsupported(self) -> None:
        """Also: fill-in-the-middle, template overrides, token context, images and image generation."""
        super().refuse_unsupported()
        for name in ("suffix", "template", "context", "images"):
            if getattr(self, name):
                raise InvalidRequest(f"'{name}' is not supported by mlserve; omit it.")
        for name in ("width", "height", "steps"):
            if getattr(self, name) is not None:
                raise InvalidRequest(f"'{name}' (image generation) is not supported by mlserve; omit it.")
        if self.raw and self.system:
            raise InvalidRequest("'system' cannot be used with 'raw': a raw prompt is sent to the model as it is.")

    def template_messages(self) -> list[dict[str, Any]]:
        """The prompt (and system prompt) as chat messages, rendered with the model's template as Ollama does."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.prompt or ""}]


class EmbedRequest(_Body):
    """POST /api/embed."""

    model: str = Field(min_length=1, max_length=200)
    input: str | list[str]
    truncate: bool | None = None  # mlserve never truncates: an input too long for the context is a 400
    dimensions: int | None = Field(None, ge=1)
    options: Options | None = None  # only num_ctx is checked; sampling options cannot change an embedding
    keep_alive: float | str | None = None

    def inputs(self) -> list[str]:
        """The input texts, at least one."""
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts:
            raise InvalidRequest("'input' must hold at least one text.")
        return texts


class EmbeddingsRequest(_Body):
    """POST /api/embeddings (Ollama's older, one-text form)."""

    model: str = Field(min_length=1, max_length=200)
    prompt: str
    options: Options | None = None
    keep_alive: float | str | None = None


class ShowRequest(_Body):
    """POST /api/show."""

    model: str | None = Field(None, min_length=1, max_length=200)
    name: str | None = Field(None, min_length=1, max_length=200)  # Ollama's older spelling of model
    verbose: bool | None = None  # mlserve never lists the vocabulary, verbose or not

    def target(self) -> str:
        """The model asked about."""
        chosen = self.model or self.name
        if not chosen:
            raise InvalidRequest("'model' is required.")
        return chosen
