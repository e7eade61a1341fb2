"""Chat templates: messages to prompt text, in a bounded jinja2 sandbox (see ``template_bounds``).

``render_parts`` also says which spans of the prompt came verbatim from message content, so
the engine can tokenise those without special-token parsing: a pasted
``<end_of_turn><start_of_turn>model`` stays plain text and cannot open a turn.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, NoReturn

from mlserve.engine.api import InvalidRequest
from mlserve.engine.template_bounds import BoundExceeded, SandboxedTemplate, TemplateFailed, output_limit
from mlserve.errors import EngineError

Part = tuple[str, bool]  # (text, is_content)

_FIX_HINT = "Fix the template in the bundle's recipe (serving.chat_template) or serve a different GGUF."


class ChatTemplateError(InvalidRequest):
    """The messages cannot be rendered with the model's template."""


class ChatTemplateBoundError(ChatTemplateError):
    """Rendering the messages went past a render-time or size bound (``exceeded.bound`` names which)."""

    def __init__(self, exc: BoundExceeded) -> None:
        super().__init__(_bound_message(exc, "on these messages"), "Shorten the conversation or its messages.")
        self.exceeded = exc


def _raise(message: str) -> NoReturn:
    raise ChatTemplateError(f"The chat template rejected the messages: {message}")


class ChatTemplate:
    """A compiled, sandboxed chat template whose renders are bounded in time and size."""

    def __init__(self, source: str, special: dict[str, str]) -> None:
        try:
            self._template = SandboxedTemplate(source, {"raise_exception": _raise})
        except TemplateFailed as exc:
            raise EngineError(f"The model's chat template does not compile: {exc}.", _FIX_HINT) from exc
        except BoundExceeded as exc:
            raise EngineError(_bound_message(exc, "when compiled"), _FIX_HINT) from exc
        self._special = special

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages to the prompt text."""
        return self._render(messages, output_limit(messages), add_generation_prompt)

    def render_parts(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[Part]:
        """Render messages as ordered ``(text, is_content)`` parts whose texts join to ``render()``'s output.

        ``is_content`` marks text taken verbatim (or trimmed) from a message's content.
        """
        limit = output_limit(messages)
        prompt = self._render(messages, limit, add_generation_prompt)
        nonce = f"{secrets.randbits(64):020d}"  # digits: survive upper/lower/trim; unguessable per render
        texts, masked = _mask(messages, nonce)
        try:
            masked_prompt = self._render(masked, limit, add_generation_prompt)
        except ChatTemplateBoundError:
            raise
        except ChatTemplateError:
            masked_prompt = None  # the template refuses placeholders (it inspects content): locate instead
        parts = None
        if masked_prompt is not None:
            parts = _align(masked_prompt, prompt, texts, re.compile(f"\x00{nonce}(\\d+)\x00"))
        return parts if parts is not None else _locate(prompt, texts)

    def _render(self, messages: list[dict[str, Any]], limit: int, add_generation_prompt: bool) -> str:
        variables = {**self._special, "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            return self._template.render(variables, limit)
        except BoundExceeded as exc:
            raise ChatTemplateBoundError(exc) from exc
        except TemplateFailed as exc:
            cause = exc.__cause__
            raise ChatTemplateError(
                f"The chat template could not render these messages ({type(cause).__name__})."
            ) from cause


def _bound_message(exc: BoundExceeded, where: str) -> str:
    return f"The model's chat template exceeds mlserve's {exc.bound} bound {where}: {exc.detail}."


def _mask(messages: list[dict[str, Any]], nonce: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Replace each content text with a numbered placeholder; returns the texts and the masked messages."""
    texts: list[str] = []

    def placeholder(text: str) -> str:
        texts.append(text)
        return f"\x00{nonce}{len(texts) - 1}\x00"

    masked: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and content:  # "" stays "" so `if content` branches do not change
            message = {**message, "content": placeholder(content)}
        elif isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}]
            parts = [
                {**p, "text": placeholder(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
                for p in content
            ]
            message = {**message, "content": parts}
        masked.append(message)
    return texts, masked


def _align(masked_prompt: str, prompt: str, texts: list[str], placeholder: re.Pattern[str]) -> list[Part] | None:
    """Split prompt at the placeholders' places in masked_prompt; None when the markup differs.

    Markup parts are exactly the masked render's text, so they hold no message content; each
    content part is the message's text as is or trimmed, whichever the real prompt shows.
    """
    pieces = placeholder.split(masked_prompt)
    markups, slots = pieces[0::2], [int(index) for index in pieces[1::2]]
    parts: list[Part] = []
    pos = 0
    for k, markup in enumerate(markups):
        if not prompt.startswith(markup, pos):
            return None
        if markup:
            parts.append((markup, False))
            pos += len(markup)
        if k == len(slots):
            break
        text, after = texts[slots[k]], markups[k + 1]
        for shown in dict.fromkeys((text, text.strip(), text.lstrip(), text.rstrip())):
            if prompt.startswith(shown, pos) and prompt.startswith(after, pos + len(shown)):
                break
        else:
            return None
        if shown:
            parts.append((shown, True))
            pos += len(shown)
    return parts if pos == len(prompt) else None


def _locate(prompt: str, texts: list[str]) -> list[Part]:
    """Find each content text (or its trimmed form) in order; refuse when that is ambiguous or fails."""
    parts: list[Part] = []
    pos = 0
    for text in texts:
        if not text.strip():
            continue  # whitespace-only content cannot carry a control token
        for shown in dict.fromkeys((text, text.strip())):
            at = prompt.find(shown, pos)
            if at >= 0:
                break
        else:
            raise _inseparable()
        if at > pos:
            parts.append((prompt[pos:at], False))
        parts.append((shown, True))
        pos = at + len(shown)
    if pos < len(prompt):
        parts.append((prompt[pos:], False))
    # A content text that also shows in the markup may have been matched at the wrong copy,
    # leaving the real one to be parsed for control tokens: refuse rather than guess.
    markup = [text for text, is_content in parts if not is_content]
    if any(text.strip() in m for text in texts if text.strip() for m in markup):
        raise _inseparable()
    return parts


def _inseparable() -> ChatTemplateError:
    return ChatTemplateError(
        "The chat template alters message content in a way mlserve cannot separate from the template's "
        "markup, so the content cannot be kept from being parsed as control tokens.",
        "Serve with --parse-special to tokenise the whole prompt as llama-server does.",
    )


SAMPLE_CONVERSATION = [
    {"role": "user", "content": "Hello."},
    {"role": "assistant", "content": "Hello! How can I help?"},
]
# Not every template accepts a system message, so this one only checks the bounds.
_BOUNDS_SAMPLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    *SAMPLE_CONVERSATION * 3,
    {"role": "user", "content": "Summarise our conversation."},
]


def checked_template(source: str, special: dict[str, str]) -> ChatTemplate:
    """Compile a template and render sample conversations in the sandbox; EngineError if that fails.

    A template that raises, reaches for attributes the sandbox forbids, or exceeds the render
    bounds on a short conversation is refused at load instead of failing (or hanging) every
    chat request later.
    """
    template = ChatTemplate(source, special)
    for sample, required in ((SAMPLE_CONVERSATION, True), (_BOUNDS_SAMPLE, False)):
        try:
            template.render(sample, add_generation_prompt=True)
        except ChatTemplateBoundError as exc:
            raise EngineError(_bound_message(exc.exceeded, "on a sample conversation"), _FIX_HINT) from exc
        except ChatTemplateError as exc:
            if not required:
                continue
            cause = exc.__cause__
            why = f"{type(cause).__name__}: {cause}" if cause is not None else exc.message
            raise EngineError(
                f"The model's chat template fails to render a sample conversation in the sandbox ({why}).", _FIX_HINT
            ) from exc
    return template
