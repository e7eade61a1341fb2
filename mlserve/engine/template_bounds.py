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

This is the only module that imports jinja2.
"""

from __future__ import annotations

import functools
import math
import re
import string
import sys
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from contextvars import ContextVar
from types import FrameType
from typing import Any, cast

from jinja2 import TemplateError, nodes, sandbox
from jinja2.compiler import CodeGenerator, Frame
from jinja2.filters import make_attrgetter
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

RENDER_SECONDS = 0.5  # wall clock per render; Gemma's template needs about a millisecond
OUTPUT_BASE_CHARS = 1 << 20  # markup allowance on top of the messages' own text
OUTPUT_CONTENT_FACTOR = 2  # room for a template that shows a message's text twice
MAX_INT_BITS = 1 << 16  # no chat template needs more; products this size cost microseconds
MAX_JSON_INDENT = 64

# The budget of the render running on this thread (checks outside a render use the base).
_LIMIT: ContextVar[int] = ContextVar("mlserve_template_limit", default=OUTPUT_BASE_CHARS)
_CLOCK: ContextVar[tuple[float, float]] = ContextVar("mlserve_template_clock", default=(math.inf, RENDER_SECONDS))
_SEQUENCES = (str, bytes, list, tuple)
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


class TemplateFailed(Exception):
    """The template does not compile, or failed while rendering."""


class BoundExceeded(Exception):
    """A template went past a time or size bound; ``bound`` names which."""

    def __init__(self, bound: str, detail: str) -> None:
        super().__init__(f"{bound}: {detail}")
        self.bound = bound
        self.detail = detail


class _Stop(BaseException):
    """A bound was hit mid-render; args are BoundExceeded's.

    A BaseException so that no ``except Exception`` in jinja2 or a helper swallows it: once a
    trace function raises, Python turns tracing off, and a swallowed stop would run unbounded.
    """


def output_limit(value: Any) -> int:
    """The output budget for a render whose inputs are ``value``: a fixed allowance plus their text, twice."""
    total, stack, seen = 0, [value], set()
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, (list, tuple, dict)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    return OUTPUT_BASE_CHARS + OUTPUT_CONTENT_FACTOR * total


def tree_size(value: Any, budget: int) -> int:
    """About how many characters ``str(value)`` takes, counting a shared element at every place; stops past budget."""
    total, stack, steps = 0, [value], 0
    while stack and total <= budget:
        steps += 1
        if not steps & 0xFFF:
            _check_clock()
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, Namespace):
            stack.append(object.__getattribute__(item, "_Namespace__attrs"))
        elif isinstance(item, (list, tuple, set, frozenset, dict)):
            total += 2 + 2 * len(item)
            if total <= budget:
                stack.extend(item.items() if isinstance(item, dict) else item)
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        else:
            total += 8
    return total


def _check_clock() -> None:
    """The deadline, for loops here that make no Python call (the trace hook skips this module's lines)."""
    deadline, seconds = _CLOCK.get()
    if time.monotonic() > deadline:
        raise _Stop("render time", f"rendering took over {seconds:g} s")


def _need(size: int, what: str) -> None:
    limit = _LIMIT.get()
    if size > limit:
        raise _Stop("output size", f"{what} would be {size:,} characters (limit {limit:,})")


def _need_bits(bits: int, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise _Stop("integer size", f"{what} would have {bits:,} bits (limit {MAX_INT_BITS:,})")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes)) else tree_size(value, _LIMIT.get())


def _sizes(values: Iterable[Any]) -> int:
    limit, total = _LIMIT.get(), 0
    for steps, value in enumerate(values, 1):
        if isinstance(value, (str, bytes)):  # scalars inline: a call per item costs microseconds when traced
            total += len(value)
        elif isinstance(value, int):
            total += value.bit_length() // 3 + 1
        else:
            total += tree_size(value, limit - total)
        if total > limit:
            break
        if not steps & 0xFFF:
            _check_clock()
    return total


def _check(value: Any, what: str) -> Any:
    _need(_size(value), what)
    return value


def _width(digits: str) -> int:
    return int(digits) if len(digits) <= 18 else 1 << 62  # int() of thousands of digits is itself slow


def _check_binop(op: str, left: Any, right: Any) -> None:
    """Refuse an operator whose result would pass the budget, before Python computes it."""
    if op == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        _need(_size(left) + _size(right), "a + result")
    elif op == "*" and isinstance(left, int) and isinstance(right, int):
        _need_bits(left.bit_length() + right.bit_length(), "a * result")
    elif op == "*":
        seq, times = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(seq, _SEQUENCES) and isinstance(times, int) and times > 0:
            _need(_size(seq) * times, "a repetition")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        _need_bits(left.bit_length() * right, "a ** result")
    elif op == "%" and isinstance(left, (str, bytes)):
        _check_percent(left, right)


def _check_percent(fmt: str | bytes, args: Any) -> None:
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    values = args if isinstance(args, tuple) else (args,)
    for field in (f for spec in _PERCENT_SPEC.findall(text) for f in spec if f):
        if field == "*":
            _need(max((abs(v) for v in values if isinstance(v, int)), default=0), "a %-format width")
        else:
            _need(_width(field), "a %-format width")
    _need(len(text) + _sizes(values), "a %-format result")


def _check_format(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec and "{" in spec:
            raise _Stop("output size", "a format spec with a nested field cannot be sized before it runs")
        for digits in re.findall(r"\d+", spec or ""):
            _need(_width(digits), "a format width")
    _need(len(fmt) + _sizes([*args, *kwargs.values()]), "a format result")


def _replace_size(s: Any, old: Any, new: Any, count: Any) -> int:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        hits = s.count(old) if old else len(s) + 1
    elif isinstance(s, bytes) and isinstance(old, bytes) and isinstance(new, bytes):
        hits = s.count(old) if old else len(s) + 1
    else:
        return _size(s)  # mixed types raise TypeError before copying anything
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _check_method(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Size the builtin methods that can allocate far more than their inputs; returns args, iterables listed."""
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if isinstance(owner, (str, bytes)):
        if name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int):
            _need(max(len(owner), args[0]), f"str.{name}()")
        elif name == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
            _need(len(owner) + tabs * (tab if isinstance(tab, int) else 0), "str.expandtabs()")
        elif name == "replace" and len(args) >= 2:
            count = args[2] if len(args) > 2 else kwargs.get("count", -1)
            _need(_replace_size(owner, args[0], args[1], count), "str.replace()")
        elif name == "join" and args:
            items = list(args[0])
            _need(_sizes(items) + len(owner) * len(items), "str.join()")
            return (items, *args[1:])
        elif name == "translate" and args:
            table = args[0]
            values = table.values() if isinstance(table, Mapping) else table if isinstance(table, list) else ()
            widest = max((_size(v) for v in values), default=1)
            _need(len(owner) * widest, "str.translate()")
    elif isinstance(owner, int) and name == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        _need(length if isinstance(length, int) else 0, "int.to_bytes()")
    elif owner is dict and name == "fromkeys" and args:
        keys = list(args[0])
        _need(len(keys) * (1 + _size(args[1] if len(args) > 1 else None)), "dict.fromkeys()")
        return (keys, *args[1:])
    return args


# Filters that can amplify their input, checked with the filter's own parameters.
def _center(env: Any, value: Any, width: Any = 80, *_: Any) -> None:
    _need(max(_size(value), width if isinstance(width, int) else 0), "the center filter's result")


def _indent(env: Any, s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    lines = s.count("\n") + 1 if isinstance(s, str) else _size(s) + 1
    per_line = width if isinstance(width, int) else _size(width)
    _need(_size(s) + lines * per_line, "the indent filter's result")


def _wordwrap(env: Any, s: Any, width: Any = 79, breaks: Any = True, wrapstring: Any = None, **_: Any) -> None:
    wrap = wrapstring if isinstance(wrapstring, str) else "\n"
    _need(_size(s) + (_size(s) + 1) * len(wrap), "the wordwrap filter's result")  # at most one wrap per character


def _format(env: Any, value: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(value, str):
        _check_percent(value, kwargs or args)


def _replace(env: Any, s: Any, old: Any, new: Any, count: Any = None) -> None:
    texts = [v if isinstance(v, str) else str(_check(v, "a replace argument")) for v in (s, old, new)]
    _need(_replace_size(texts[0], texts[1], texts[2], count), "the replace filter's result")


def _join(env: Any, value: Any, d: Any = "", attribute: Any = None) -> None:
    items = value if attribute is None else [make_attrgetter(env, attribute)(item) for item in value]
    _need(_sizes(items) + _size(d) * len(items), "the join filter's result")


def _tojson(env: Any, value: Any, indent: Any = None) -> None:
    width = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
    if width > MAX_JSON_INDENT:
        raise _Stop("output size", f"tojson indent is over {MAX_JSON_INDENT}")


def _batch(env: Any, value: Any, linecount: Any, fill_with: Any = None) -> None:
    if isinstance(linecount, int):
        _need(linecount * (1 + _size(fill_with)), "the batch filter's fill")


def _sum(env: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> None:
    if not isinstance(start, (int, float)):
        raise _Stop("output size", "sum() of sequences copies quadratically; use join")


_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": _center,
    "indent": _indent,
    "wordwrap": _wordwrap,
    "format": _format,
    "replace": _replace,
    "join": _join,
    "tojson": _tojson,
    "batch": _batch,
    "sum": _sum,
}


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
        return value if isinstance(value, str) else _check(value, "a value")

    @staticmethod
    def concat(parts: Iterable[str]) -> str:
        """Join a block's output (macro, set block, call block), refusing one past the budget."""
        texts = list(parts)
        _need(sum(map(len, texts)), "a block's output")
        return "".join(texts)

    def bounded_join(self, values: tuple[Any, ...]) -> str:
        """``a ~ b``: str() each value and join, refusing a result past the budget."""
        texts = [value if isinstance(value, str) else str(_check(value, "a ~ operand")) for value in values]
        _need(sum(map(len, texts)), "a ~ result")
        return "".join(texts)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Size ``+ * ** %`` before computing them."""
        if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept cheap
            if len(left) + len(right) > _LIMIT.get():
                _need(len(left) + len(right), "a + result")
            return left + right
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Size amplifying builtin methods before the call and every result after it."""
        args = _check_method(obj, args, kwargs)
        return _check(super().call(context, obj, *args, **kwargs), "a call's result")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Size ``str.format`` calls (widths, arguments) before formatting."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt: str = value.__self__
        is_map = value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(fmt, () if is_map else args, args[0] if is_map and args else kwargs)
            return wrapped(*args, **kwargs)

        return checked

    def _bounded_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        skip = 0 if getattr(func, "jinja_pass_arg", None) is None else 1
        check = _FILTER_CHECKS.get(name)

        @functools.wraps(func)  # keeps jinja_pass_arg, so jinja passes the same leading argument
        def bounded(*args: Any, **kwargs: Any) -> Any:
            if len(args) > skip:
                if name == "join" and not isinstance(args[skip], _SEQUENCES):
                    args = (*args[:skip], list(args[skip]), *args[skip + 1 :])  # to size it, list it once
                if not isinstance(args[skip], str):
                    _check(args[skip], f"the {name} filter's input")
                if check is not None:
                    check(self, *args[skip:], **kwargs)
            return _check(func(*args, **kwargs), f"the {name} filter's result")

        return bounded


# A line event costs ~0.4 us. In these files every loop either calls a Python function (a call
# event checks the deadline) or calls _check_clock itself, so their lines need no events.
_QUIET_FILES = frozenset({__file__, sandbox.__file__, "<frozen abc>"})
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
        except _Stop as stop:
            raise BoundExceeded(*stop.args) from None
        except _FAILURES as exc:
            raise TemplateFailed(f"{type(exc).__name__}: {exc}") from exc

    def render(self, variables: Mapping[str, Any], limit: int, seconds: float = RENDER_SECONDS) -> str:
        """Render within ``seconds`` and ``limit`` characters; BoundExceeded or TemplateFailed otherwise."""
        deadline = time.monotonic() + seconds
        token, clock = _LIMIT.set(limit), _CLOCK.set((deadline, seconds))
        try:
            return "".join(self._chunks(variables, limit, deadline, seconds))
        except _Stop as stop:
            raise BoundExceeded(*stop.args) from None
        except _FAILURES as exc:
            raise TemplateFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            _LIMIT.reset(token)
            _CLOCK.reset(clock)

    def _chunks(self, variables: Mapping[str, Any], limit: int, deadline: float, seconds: float) -> list[str]:
        monotonic, quiet = time.monotonic, _QUIET_FILES  # locals: this runs on every traced event

        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            if monotonic() > deadline:
                raise _Stop("render time", f"rendering took over {seconds:g} s")
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
                        raise _Stop("output size", f"the prompt passed {limit:,} characters")
                    chunks.append(chunk)
            finally:
                stream.close()
        finally:
            sys.settrace(previous)
        return chunks
