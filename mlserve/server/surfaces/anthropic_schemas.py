"""Request bodies of the Anthropic Messages surface, validated at the boundary.

Anthropic features mlserve does not provide (tools, images and documents, extended thinking,
containers, MCP servers, ...) are declared so that a request using them is refused with a 400
naming them, never answered as if they had been honoured.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mlserve.engine.api import InvalidRequest
from mlserve.server.surfaces.common import MlserveOptions, check_stops

# Block types Anthropic defines that a text model cannot take: named in the refusal (any other
# type is refused without echoing it, since a client's unknown text might be anything).
KNOWN_BLOCKS = frozenset(
    {
        "image",
        "document",
        "search_result",
        "tool_use",
        "tool_result",
        "server_tool_use",
        "web_search_tool_result",
        "thinking",
        "redacted_thinking",
        "container_upload",
    }
)
SEPARATOR = "\n\n"  # between text blocks of one turn, and between consecutive turns of one role


class _Body(BaseModel):
    # Unknown fields are refused: an option we silently ignored would be a lie.
    model_config = ConfigDict(extra="forbid")


class Block(BaseModel):
    """A content block; only ``text`` is served (other types are kept long enough to be refused by name)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(max_length=64)
    text: str | None = None
    cache_control: dict[str, Any] | None = None  # prompt caching only changes cost: accepted, ignored
    citations: list[Any] | None = None

    def checked_text(self, where: str) -> str:
        """The block's text; 400 for a block mlserve cannot read."""
        if self.type != "text":
            kind = f"'{self.type}' blocks" if self.type in KNOWN_BLOCKS else "this content block type"
            raise InvalidRequest(f"{where}: {kind} are not supported by mlserve (text models, text blocks only).")
        if self.text is None:
            raise InvalidRequest(f"{where}: a text block needs 'text'.")
        if self.citations:
            raise InvalidRequest(f"{where}: 'citations' are not supported by mlserve.")
        if self.model_extra:
            raise InvalidRequest(f"{where}: a field of this text block is not supported.")
        return self.text


def _text(content: str | list[Block], where: str) -> str:
    if isinstance(content, str):
        return content
    return SEPARATOR.join(b.checked_text(f"{where}.{i}") for i, b in enumerate(content))


class Turn(_Body):
    """One message of the conversation."""

    role: Literal["user", "assistant"]
    content: str | list[Block]


class Metadata(_Body):
    """Anthropic's ``metadata``: an opaque user id, accepted and not used."""

    user_id: str | None = Field(None, max_length=256)


class JsonFormat(_Body):
    """``output_config.format``: a JSON Schema the reply must match."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Body):
    """Anthropic's ``output_config``; ``effort`` (a thinking budget) is refused."""

    format: JsonFormat | None = None
    effort: str | None = None


class _Conversation(_Body):
    """What /v1/messages and /v1/messages/count_tokens share: the model, system prompt and turns."""

    model: str = Field(min_length=1, max_length=200)
    messages: list[Turn] = Field(min_length=1)
    system: str | list[Block] | None = None
    output_config: OutputConfig | None = None
    cache_control: dict[str, Any] | None = None  # automatic prompt caching: cost only, accepted, ignored
    speed: Literal["standard"] | None = None  # "fast" mode is not offered
    # Declared so that a refusal can name them.
    tools: list[Any] | None = None
    tool_choice: Any = None
    thinking: Any = None
    user_profile_id: Any = None
    workspace_id: Any = None

    def refuse_unsupported(self) -> None:
        """400 naming an Anthropic feature the request asks for that mlserve does not provide."""
        if self.tools:
            raise InvalidRequest("'tools' is not supported by mlserve; send the request without tools.")
        if self.tool_choice is not None:
            raise InvalidRequest("'tool_choice' is not supported by mlserve; omit it.")
        if self.thinking is not None and self.thinking != {"type": "disabled"}:
            raise InvalidRequest("'thinking' (extended thinking) is not supported by mlserve; omit it.")
        if self.output_config is not None and self.output_config.effort is not None:
            raise InvalidRequest("'output_config.effort' is not supported by mlserve; omit it.")
        for name in ("user_profile_id", "workspace_id"):
            if getattr(self, name) is not None:
                raise InvalidRequest(f"'{name}' is not supported by mlserve; omit it.")

    def template_messages(self) -> list[dict[str, Any]]:
        """System prompt and turns as the chat template expects them; consecutive same-role turns merged."""
        self.refuse_unsupported()
        out: list[dict[str, Any]] = []
        if self.system:
            out.append({"role": "system", "content": _text(self.system, "system")})
        turns: list[dict[str, Any]] = []
        for i, turn in enumerate(self.messages):
            text = _text(turn.content, f"messages.{i}.content")
            if turns and turns[-1]["role"] == turn.role:  # Anthropic combines them into one turn
                turns[-1]["content"] += SEPARATOR + text
            else:
                turns.append({"role": turn.role, "content": text})
        if turns[-1]["role"] == "assistant":
            raise InvalidRequest(
                "The last message is from the assistant; prefill (continuing a partial reply) is not "
                "supported by mlserve. End the conversation with a user message."
            )
        return out + turns

    def json_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the reply must match, if any."""
        fmt = self.output_config.format if self.output_config is not None else None
        return fmt.schema_ if fmt is not None else None


class MessagesRequest(_Conversation):
    """POST /v1/messages."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)
    metadata: Metadata | None = None
    stream: bool = False
    service_tier: Literal["auto", "standard_only"] | None = None  # capacity routing: cannot change output
    mlserve: MlserveOptions | None = None  # mlserve's own options, e.g. {"deterministic": true}
    # Declared so that a refusal can name them.
    container: Any = None
    mcp_servers: list[Any] | None = None
    inference_geo: Any = None
    diagnostics: Any = None

    @field_validator("stop_sequences")
    @classmethod
    def _stop(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_stops(value)

    def refuse_unsupported(self) -> None:
        """Also containers, MCP servers, a pinned inference region and diagnostics."""
        super().refuse_unsupported()
        if self.container is not None:
            raise InvalidRequest("'container' is not supported by mlserve; omit it.")
        if self.mcp_servers:
            raise InvalidRequest("'mcp_servers' is not supported by mlserve; omit it.")
        if self.inference_geo is not None:
            # A data-residency request: refused rather than ignored, the operator decides where this runs.
            raise InvalidRequest("'inference_geo' is not supported by mlserve; this server runs where it is deployed.")
        if self.diagnostics is not None:
            raise InvalidRequest("'diagnostics' is not supported by mlserve; omit it.")


class CountTokensRequest(_Conversation):
    """POST /v1/messages/count_tokens."""
