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
