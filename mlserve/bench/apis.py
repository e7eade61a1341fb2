"""The wire protocols ``bench --api`` drives: routes, request bodies, headers and stream decoding.

Each API streams differently (OpenAI: SSE ending in ``data: [DONE]``; Ollama: NDJSON ending in
a ``"done": true`` line; Anthropic: SSE events ending in ``message_stop``), but every decoder
answers the same question per line, "did this line carry text?", so TTFT, ITL and TPOT are
measured the same way on all three. Usage comes from each protocol's own counters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

# An OpenAI chunk that carries text: "content" (chat) or "text" (completions) with a non-empty value.
_OPENAI_TOKEN = re.compile(rb'"(?:content|text)": ?"[^"]')
ANTHROPIC_VERSION = "2023-06-01"


def error_message(raw: bytes) -> str:
    """The message of an error body in any of the three shapes (or the start of the raw text)."""
    try:
        data = json.loads(raw)
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        return str(message or raw[:200].decode(errors="replace"))
    except (ValueError, TypeError, AttributeError):
        return raw[:200].decode(errors="replace").strip() or "no body"


class Decoder(Protocol):
    """Reads one streamed response line by line."""

    done: bool  # the protocol's end marker arrived
    error: str | None  # an error sent mid-stream
    prompt_tokens: int | None
    output_tokens: int | None

    def feed(self, line: bytes) -> bool:
        """Take one line; True when it carried generated text."""


@dataclass
class _State:
    done: bool = False
    error: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None


class OpenAIDecoder(_State):
    """OpenAI SSE: one regex search per line; only the usage chunk and errors are parsed as JSON."""

    def feed(self, line: bytes) -> bool:
        """Take one line; True when it carried generated text."""
        if not line.startswith(b"data:"):
            return False
        token = _OPENAI_TOKEN.search(line) is not None
        if b'"usage":{' in line or b'"usage": {' in line:
            usage = json.loads(line[5:])["usage"]
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.output_tokens = int(usage["completion_tokens"])
        elif line.startswith((b'data: {"error"', b'data:{"error"')):
            self.error = error_message(line[5:])
        elif line.rstrip() in (b"data: [DONE]", b"data:[DONE]"):
            self.done = True
        return token


class OllamaDecoder(_State):
    """Ollama NDJSON: one JSON object per line; the ``done`` line holds the counts."""

    def feed(self, line: bytes) -> bool:
        """Take one line; True when it carried generated text."""
        if not line.strip():
            return False
        try:
            data = json.loads(line)
        except ValueError:
            self.error = "a streamed line is not JSON: " + line[:80].decode(errors="replace")
            return False
        if not isinstance(data, dict):
            return False
        if "error" in data:
            self.error = str(data["error"])
            return False
        message = data.get("message")
        text = message.get("content") if isinstance(message, dict) else data.get("response")
        if data.get("done"):
            self.done = True
            self.prompt_tokens = int(data.get("prompt_eval_count") or 0)
            self.output_tokens = int(data.get("eval_count") or 0)
        return bool(text)


class AnthropicDecoder(_State):
    """Anthropic SSE events: text in ``content_block_delta``, counts in ``message_start``/``message_delta``."""

    def feed(self, line: bytes) -> bool:
        """Take one line; True when it carried generated text."""
        if not line.startswith(b"data:"):
            return False  # "event: NAME" lines repeat the type the data line holds
        try:
            data = json.loads(line[5:])
        except ValueError:
            self.error = "a streamed event is not JSON: " + line[:80].decode(errors="replace")
            return False
        kind = data.get("type")
        if kind == "content_block_delta":
            return bool(data.get("delta", {}).get("text"))
        if kind == "message_start":
            self.prompt_tokens = int(data["message"].get("usage", {}).get("input_tokens") or 0)
        elif kind == "message_delta":
            self.output_tokens = int(data.get("usage", {}).get("output_tokens") or 0)
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.error = str(data.get("error", {}).get("message") or "error event")
        return False


@dataclass(frozen=True)
class Api:
    """One protocol: where a prompt and a chat go, how they are written, and how the answer streams."""

    name: str
    chat_route: str
    prompt_route: str  # a raw prompt, no chat template (Anthropic has none: its prompts go as one user turn)
    accept: str
    end_marker: str  # named in the error when a stream stops without it

    def headers(self, api_key: str | None) -> dict[str, str]:
        """Request headers, the key in this protocol's header."""
        headers = {"content-type": "application/json", "accept": self.accept}
        if self.name == "anthropic":
            headers["anthropic-version"] = ANTHROPIC_VERSION
            if api_key:
                headers["x-api-key"] = api_key
        elif api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return headers

    def decoder(self) -> Decoder:
        """A fresh decoder for one response."""
        decoders: dict[str, type[Decoder]] = {
            "openai": OpenAIDecoder,
            "ollama": OllamaDecoder,
            "anthropic": AnthropicDecoder,
        }
        return decoders[self.name]()

    def prompt_body(self, model: str, prompt: str, output_len: int, temperature: float | None) -> dict[str, Any]:
        """A streamed request for a raw prompt (sent to ``prompt_route``)."""
        if self.name == "openai":
            return _openai(model, output_len, temperature, prompt=prompt)
        if self.name == "ollama":
            return _ollama(model, output_len, temperature, prompt=prompt, raw=True)
        return self.chat_body(model, [{"role": "user", "content": prompt}], output_len, temperature)

    def chat_body(
        self, model: str, messages: list[dict[str, Any]], output_len: int, temperature: float | None
    ) -> dict[str, Any]:
        """A streamed chat request (sent to ``chat_route``)."""
        if self.name == "openai":
            return _openai(model, output_len, temperature, messages=messages)
        if self.name == "ollama":
            return _ollama(model, output_len, temperature, messages=messages)
        system = "\n\n".join(str(m["content"]) for m in messages if m.get("role") == "system")
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": output_len,
            "messages": [m for m in messages if m.get("role") != "system"],
            "stream": True,
        }
        if system:
            body["system"] = system
        if temperature is not None:
            body["temperature"] = temperature
        return body


def _openai(model: str, output_len: int, temperature: float | None, **payload: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, **payload, "max_tokens": output_len, "stream": True}
    body["stream_options"] = {"include_usage": True}
    if temperature is not None:
        body["temperature"] = temperature
    return body


def _ollama(model: str, output_len: int, temperature: float | None, **payload: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"num_predict": output_len}
    if temperature is not None:
        options["temperature"] = temperature
    return {"model": model, **payload, "stream": True, "options": options}


APIS: dict[str, Api] = {
    "openai": Api("openai", "/v1/chat/completions", "/v1/completions", "text/event-stream", "data: [DONE]"),
    "ollama": Api("ollama", "/api/chat", "/api/generate", "application/x-ndjson", 'a "done": true line'),
    "anthropic": Api("anthropic", "/v1/messages", "/v1/messages", "text/event-stream", "message_stop"),
}
