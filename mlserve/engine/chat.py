"""Chat templates rendered in jinja2's immutable sandbox."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlserve.engine.base import RequestError
from mlserve.errors import EngineError


class ChatTemplateError(RequestError):
    """The messages cannot be rendered with the model's template."""


def _raise(message: str) -> None:
    raise ChatTemplateError(f"The chat template rejected the messages: {message}")


class ChatTemplate:
    """A compiled, sandboxed chat template."""

    def __init__(self, source: str, special: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise EngineError(f"The model's chat template does not compile: {exc}.") from exc
        self._special = special

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages to the prompt text."""
        try:
            return str(
                self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self._special)
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, KeyError, IndexError) as exc:
            raise ChatTemplateError(
                f"The chat template could not render these messages ({type(exc).__name__})."
            ) from exc


SAMPLE_CONVERSATION = [
    {"role": "user", "content": "Hello."},
    {"role": "assistant", "content": "Hello! How can I help?"},
]


def checked_template(source: str, special: dict[str, str]) -> ChatTemplate:
    """Compile a template and render a two-message sample in the sandbox; EngineError if either fails.

    A template that raises, or reaches for attributes the sandbox forbids, is refused at
    load instead of failing every chat request later.
    """
    template = ChatTemplate(source, special)
    try:
        template.render(SAMPLE_CONVERSATION, add_generation_prompt=True)
    except ChatTemplateError as exc:
        cause = exc.__cause__
        why = f"{type(cause).__name__}: {cause}" if cause is not None else exc.message
        raise EngineError(
            f"The model's chat template fails to render a sample conversation in the sandbox ({why}).",
            "Fix the template in the bundle's recipe (serving.chat_template) or serve a different GGUF.",
        ) from exc
    return template
