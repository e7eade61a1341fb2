"""Size and time checks for untrusted jinja2 templates: budgets, and the checks run before amplifying steps.

``template_bounds`` wires these into its sandbox: each check runs *before* an operation that can
amplify its inputs in one C call (``*``, ``**``, ``%``, ``+``, ``~``, padding, joining, replacing,
formatting) and refuses it by raising ``Stop`` once the render's budget (``LIMIT``) or deadline
(``CLOCK``) would be passed.
"""

from __future__ import annotations

import math
import re
import string
import time
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import Any

from jinja2.filters import make_attrgetter
from jinja2.utils import Namespace

RENDER_SECONDS = 0.5  # wall clock per render; Gemma's template needs about a millisecond
OUTPUT_BASE_CHARS = 1 << 20  # markup allowance on top of the messages' own text
OUTPUT_CONTENT_FACTOR = 2  # room for a template that shows a message's text twice
MAX_INT_BITS = 1 << 16  # no chat template needs more; products this size cost microseconds
MAX_JSON_INDENT = 64

# The budget of the render running on this thread (checks outside a render use the base).
LIMIT: ContextVar[int] = ContextVar("mlserve_template_limit", default=OUTPUT_BASE_CHARS)
CLOCK: ContextVar[tuple[float, float]] = ContextVar("mlserve_template_clock", default=(math.inf, RENDER_SECONDS))
SEQUENCES = (str, bytes, list, tuple)
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


class TemplateFailed(Exception):
    """The template does not compile, or failed while rendering."""


class BoundExceeded(Exception):
    """A template went past a time or size bound; ``bound`` names which."""

    def __init__(self, bound: str, detail: str) -> None:
        super().__init__(f"{bound}: {detail}")
        self.bound = bound
        self.detail = detail


class Stop(BaseException):
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
            check_clock()
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


def check_clock() -> None:
    """The deadline, for loops here that make no Python call (the trace hook skips this module's lines)."""
    deadline, seconds = CLOCK.get()
    if time.monotonic() > deadline:
        raise Stop("render time", f"rendering took over {seconds:g} s")


def need(size: int, what: str) -> None:
    limit = LIMIT.get()
    if size > limit:
        raise Stop("output size", f"{what} would be {size:,} characters (limit {limit:,})")


def need_bits(bits: int, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise Stop("integer size", f"{what} would have {bits:,} bits (limit {MAX_INT_BITS:,})")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes)) else tree_size(value, LIMIT.get())


def _sizes(values: Iterable[Any]) -> int:
    limit, total = LIMIT.get(), 0
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
            check_clock()
    return total


def check(value: Any, what: str) -> Any:
    need(_size(value), what)
    return value


def _width(digits: str) -> int:
    return int(digits) if len(digits) <= 18 else 1 << 62  # int() of thousands of digits is itself slow


def check_binop(op: str, left: Any, right: Any) -> None:
    """Refuse an operator whose result would pass the budget, before Python computes it."""
    if op == "+" and isinstance(left, SEQUENCES) and isinstance(right, SEQUENCES):
        need(_size(left) + _size(right), "a + result")
    elif op == "*" and isinstance(left, int) and isinstance(right, int):
        need_bits(left.bit_length() + right.bit_length(), "a * result")
    elif op == "*":
        seq, times = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(seq, SEQUENCES) and isinstance(times, int) and times > 0:
            need(_size(seq) * times, "a repetition")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        need_bits(left.bit_length() * right, "a ** result")
    elif op == "%" and isinstance(left, (str, bytes)):
        check_percent(left, right)


def check_percent(fmt: str | bytes, args: Any) -> None:
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    values = args if isinstance(args, tuple) else (args,)
    for field in (f for spec in _PERCENT_SPEC.findall(text) for f in spec if f):
        if field == "*":
            need(max((abs(v) for v in values if isinstance(v, int)), default=0), "a %-format width")
        else:
            need(_width(field), "a %-format width")
    need(len(text) + _sizes(values), "a %-format result")


def check_format(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec and "{" in spec:
            raise Stop("output size", "a format spec with a nested field cannot be sized before it runs")
        for digits in re.findall(r"\d+", spec or ""):
            need(_width(digits), "a format width")
    need(len(fmt) + _sizes([*args, *kwargs.values()]), "a format result")


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


def check_method(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Size the builtin methods that can allocate far more than their inputs; returns args, iterables listed."""
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if isinstance(owner, (str, bytes)):
        if name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int):
            need(max(len(owner), args[0]), f"str.{name}()")
        elif name == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
            need(len(owner) + tabs * (tab if isinstance(tab, int) else 0), "str.expandtabs()")
        elif name == "replace" and len(args) >= 2:
            count = args[2] if len(args) > 2 else kwargs.get("count", -1)
            need(_replace_size(owner, args[0], args[1], count), "str.replace()")
        elif name == "join" and args:
            items = list(args[0])
            need(_sizes(items) + len(owner) * len(items), "str.join()")
            return (items, *args[1:])
        elif name == "translate" and args:
            table = args[0]
            values = table.values() if isinstance(table, Mapping) else table if isinstance(table, list) else ()
            widest = max((_size(v) for v in values), default=1)
            need(len(owner) * widest, "str.translate()")
    elif isinstance(owner, int) and name == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        need(length if isinstance(length, int) else 0, "int.to_bytes()")
    elif owner is dict and name == "fromkeys" and args:
        keys = list(args[0])
        need(len(keys) * (1 + _size(args[1] if len(args) > 1 else None)), "dict.fromkeys()")
        return (keys, *args[1:])
    return args


# Filters that can amplify their input, checked with the filter's own parameters.
def _center(env: Any, value: Any, width: Any = 80, *_: Any) -> None:
    need(max(_size(value), width if isinstance(width, int) else 0), "the center filter's result")


def _indent(env: Any, s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    lines = s.count("\n") + 1 if isinstance(s, str) else _size(s) + 1
    per_line = width if isinstance(width, int) else _size(width)
    need(_size(s) + lines * per_line, "the indent filter's result")


def _wordwrap(env: Any, s: Any, width: Any = 79, breaks: Any = True, wrapstring: Any = None, **_: Any) -> None:
    wrap = wrapstring if isinstance(wrapstring, str) else "\n"
    need(_size(s) + (_size(s) + 1) * len(wrap), "the wordwrap filter's result")  # at most one wrap per character


def _format(env: Any, value: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(value, str):
        check_percent(value, kwargs or args)


def _replace(env: Any, s: Any, old: Any, new: Any, count: Any = None) -> None:
    texts = [v if isinstance(v, str) else str(check(v, "a replace argument")) for v in (s, old, new)]
    need(_replace_size(texts[0], texts[1], texts[2], count), "the replace filter's result")


def _join(env: Any, value: Any, d: Any = "", attribute: Any = None) -> None:
    items = value if attribute is None else [make_attrgetter(env, attribute)(item) for item in value]
    need(_sizes(items) + _size(d) * len(items), "the join filter's result")


def _tojson(env: Any, value: Any, indent: Any = None) -> None:
    width = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
    if width > MAX_JSON_INDENT:
        raise Stop("output size", f"tojson indent is over {MAX_JSON_INDENT}")


def _batch(env: Any, value: Any, linecount: Any, fill_with: Any = None) -> None:
    if isinstance(linecount, int):
        need(linecount * (1 + _size(fill_with)), "the batch filter's fill")


def _sum(env: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> None:
    if not isinstance(start, (int, float)):
        raise Stop("output size", "sum() of sequences copies quadratically; use join")


FILTER_CHECKS: dict[str, Callable[..., None]] = {
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
