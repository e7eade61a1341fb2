"""Run an untrusted jinja2 template (a GGUF's chat template) within time and size bounds.

jinja2's sandbox stops attribute escapes, not resource use: a template can loop 10^10 times,
compute ``7 ** 100000000`` or build a terabyte string in one C call, and hang the server.
Three layers bound a render:

- a deadline (``RENDER_SECONDS``) checked by a ``sys.settrace`` hook on the rendering thread:
  every Python call and line fires it, so even loops that emit nothing stop;
- a size budget (``output_limit``) checked *before* each step that can amplify its inputs in
  one C call (``*``, ``**``, ``%``, ``+``, ``~``, container literals, padding, joining,
  replacing and formatting in filters and str methods) and on every call's result;
- the same budget on the streamed output, so rendering stops as soon as it is passed.

This module and ``template_sizes`` (the checks themselves) are the only ones importing jinja2.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from types import FrameType
from typing import Any, cast

from jinja2 import TemplateError, nodes, sandbox
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mlserve.engine import template_sizes
from mlserve.engine.template_sizes import (
    CLOCK,
    FILTER_CHECKS,
    LIMIT,
    RENDER_SECONDS,
    SEQUENCES,
    BoundExceeded,
    Stop,
    TemplateFailed,
    check,
    check_binop,
    check_format,
    check_method,
    need,
    output_limit,
)


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles ``~`` and container literals to calls that size them first."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _sized(self, visit: Callable[[Any, Frame], None], node: nodes.Expr, frame: Frame) -> None:
        self.write("environment.sized(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self._sized(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self._sized(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx == "load":  # a store tuple is an assignment target (loop variables)
            self._sized(super().visit_Tuple, node, frame)
        else:
            super().visit_Tuple(node, frame)


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every amplifying operation sized against the render's budget."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        # trim_blocks/lstrip_blocks: how transformers renders chat templates
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=self.sized)
        self.filters = {name: self._bounded_filter(name, func) for name, func in self.filters.items()}

    @staticmethod
    def sized(value: Any) -> Any:
        """Return value, refusing a container whose text would pass the budget."""
        # A string's length is checked where it is produced, joined or output.
        return value if isinstance(value, str) else check(value, "a value")

    @staticmethod
    def concat(parts: Iterable[str]) -> str:
        """Join a block's output (macro, set block, call block), refusing one past the budget."""
        texts = list(parts)
        need(sum(map(len, texts)), "a block's output")
        return "".join(texts)

    def bounded_join(self, values: tuple[Any, ...]) -> str:
        """``a ~ b``: str() each value and join, refusing a result past the budget."""
        texts = [value if isinstance(value, str) else str(check(value, "a ~ operand")) for value in values]
        need(sum(map(len, texts)), "a ~ result")
        return "".join(texts)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Size ``+ * ** %`` before computing them."""
        if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept cheap
            if len(left) + len(right) > LIMIT.get():
                need(len(left) + len(right), "a + result")
            return left + right
        check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Size amplifying builtin methods before the call and every result after it."""
        args = check_method(obj, args, kwargs)
        return check(super().call(context, obj, *args, **kwargs), "a call's result")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Size ``str.format`` calls (widths, arguments) before formatting."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt: str = value.__self__
        is_map = value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            check_format(fmt, () if is_map else args, args[0] if is_map and args else kwargs)
            return wrapped(*args, **kwargs)

        return checked

    def _bounded_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        skip = 0 if getattr(func, "jinja_pass_arg", None) is None else 1
        filter_check = FILTER_CHECKS.get(name)

        @functools.wraps(func)  # keeps jinja_pass_arg, so jinja passes the same leading argument
        def bounded(*args: Any, **kwargs: Any) -> Any:
            if len(args) > skip:
                if name == "join" and not isinstance(args[skip], SEQUENCES):
                    args = (*args[:skip], list(args[skip]), *args[skip + 1 :])  # to size it, list it once
                if not isinstance(args[skip], str):
                    check(args[skip], f"the {name} filter's input")
                if filter_check is not None:
                    filter_check(self, *args[skip:], **kwargs)
            return check(func(*args, **kwargs), f"the {name} filter's result")

        return bounded


# A line event costs ~0.4 us. In these files every loop either calls a Python function (a call
# event checks the deadline) or calls check_clock itself, so their lines need no events.
_QUIET_FILES = frozenset({__file__, template_sizes.__file__, sandbox.__file__, "<frozen abc>"})
_FAILURES = (
    TemplateError,
    TypeError,
    ValueError,
    LookupError,
    AttributeError,
    ArithmeticError,
    RecursionError,
    MemoryError,
)


class SandboxedTemplate:
    """An untrusted template compiled in the bounded sandbox."""

    def __init__(self, source: str, globals: Mapping[str, Any]) -> None:
        env = _BoundedEnvironment()
        env.globals.update(globals)
        try:
            self._template = env.from_string(source)  # folding constants runs filters: sized too
        except Stop as stop:
            raise BoundExceeded(*stop.args) from None
        except _FAILURES as exc:
            raise TemplateFailed(f"{type(exc).__name__}: {exc}") from exc

    def render(self, variables: Mapping[str, Any], limit: int, seconds: float = RENDER_SECONDS) -> str:
        """Render within ``seconds`` and ``limit`` characters; BoundExceeded or TemplateFailed otherwise."""
        deadline = time.monotonic() + seconds
        token, clock = LIMIT.set(limit), CLOCK.set((deadline, seconds))
        try:
            return "".join(self._chunks(variables, limit, deadline, seconds))
        except Stop as stop:
            raise BoundExceeded(*stop.args) from None
        except _FAILURES as exc:
            raise TemplateFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            LIMIT.reset(token)
            CLOCK.reset(clock)

    def _chunks(self, variables: Mapping[str, Any], limit: int, deadline: float, seconds: float) -> list[str]:
        monotonic, quiet = time.monotonic, _QUIET_FILES  # locals: this runs on every traced event

        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            if monotonic() > deadline:
                raise Stop("render time", f"rendering took over {seconds:g} s")
            if event == "call" and frame.f_code.co_filename in quiet:
                return None  # see _QUIET_FILES: calls still check the deadline, lines need not
            return trace

        chunks: list[str] = []
        size = 0
        previous = sys.gettrace()  # pytest or coverage may have one; put it back after
        sys.settrace(trace)
        try:
            stream = cast(Generator[str, None, None], self._template.generate(variables))
            try:
                for chunk in stream:
                    size += len(chunk)
                    if size > limit:
                        raise Stop("output size", f"the prompt passed {limit:,} characters")
                    chunks.append(chunk)
            finally:
                stream.close()
        finally:
            sys.settrace(previous)
        return chunks


__all__ = ["BoundExceeded", "SandboxedTemplate", "TemplateFailed", "output_limit"]
