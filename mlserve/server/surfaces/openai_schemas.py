"""Request bodies of the OpenAI surface, validated at the boundary."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlserve.engine.api import InvalidRequest
from mlserve.server.surfaces.common import MlserveOptions, StopStrings

MAX_EMBED_INPUTS = 2048  # OpenAI's own limit per embeddings request


class _Body(BaseModel):
    # Unknown fields are refused: a sampling option we silently ignored would be a lie.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    """OpenAI's stream_options."""

    include_usage: bool = False


class JsonSchemaSpec(_Body):
    """``response_format.json_schema``: the schema the output must match (always enforced, strict or not)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _spec(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and allowed only then")
        return self

    def output_schema(self) -> dict[str, Any] | None:
        """The JSON Schema to enforce (None: free text)."""
        if self.json_schema is not None:
            return self.json_schema.schema_
        return {"type": "object"} if self.type == "json_object" else None


class _Sampling(_Body):
    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: StopStrings | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    logprobs: Literal[False] | None = None
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = None
    mlserve: MlserveOptions | None = None
    response_format: ResponseFormat | None = None


class TextPart(_Body):
    """A text content part."""

    type: Literal["text"]
    text: str


class Message(_Body):
    """One chat message."""

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        """The message's content as one string."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: Literal[0] | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template expects them (developer is treated as system)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] = Field(min_length=1)
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    suffix: None = None

    def prompt_text(self) -> str | list[int]:
        """The single prompt, as text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if all(isinstance(x, int) for x in p):
            return [int(x) for x in p]
        if len(p) != 1:
            raise InvalidRequest("Only one prompt per request is supported; send one request per prompt.")
        return str(p[0])


class EmbeddingRequest(_Body):
    """POST /v1/embeddings."""

    model: str = Field(min_length=1, max_length=200)
    input: str | list[str] | list[int] | list[list[int]]
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = Field(None, max_length=256)

    def texts(self) -> list[str]:
        """The inputs as a list of non-empty texts; token ids are refused (another tokenizer's ids would mislead)."""
        given = [self.input] if isinstance(self.input, str) else self.input
        if not given:
            raise InvalidRequest("'input' must hold at least one text.")
        if not all(isinstance(x, str) for x in given):
            raise InvalidRequest(
                "Token-id input is not supported: send the text (LangChain's OpenAIEmbeddings sends token ids "
                "unless created with check_embedding_ctx_length=False)."
            )
        if len(given) > MAX_EMBED_INPUTS:
            raise InvalidRequest(f"'input' holds {len(given)} texts; at most {MAX_EMBED_INPUTS} are allowed.")
        if any(not x for x in given):
            raise InvalidRequest("'input' holds an empty text.")
        return [str(x) for x in given]
