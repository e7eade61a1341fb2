"""Structured output on llama.cpp: a checked JSON Schema to GBNF, and sampling under that grammar.

It imports ``llama_cpp`` beside ``model.py`` (tests/test_layers.py lists both): the converter is
llama-cpp-python's pure-Python ``llama_grammar`` module, and the sampling loop below works on
native candidate arrays, which would double ``model.py``'s size and concern.

The vendored converter is used with three repairs, each a case where it emits a grammar that
lets invalid output through: string characters exclude raw control characters (JSON forbids
them) and surrogate escapes (one grammar character stays one code point for min/maxLength);
literals (``const``, ``enum``, property names) escape backslashes; ``date`` and ``date-time``
allow only real calendar days (no 02-30). Schemas reach it already checked and made plain by
``mlserve.engine.schema.check_schema``.
"""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp as ll
import numpy as np
from llama_cpp import llama_grammar as lg

from mlserve.engine.api import InvalidRequest

MAX_GRAMMAR_CHARS = 1 << 18
FIRST_LOOK = 64  # the best candidates, masked first: usually enough
SPLIT = 4096  # tokens sharing a first byte (" " opens half of Gemma's): indexed by their second byte too
# llama_token_data {int32 id; float logit; float p}
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])

_CHAR = lg.BuiltinRule(
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" ([0-9a-cA-CefEF] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F]'
    r" | [dD] [0-7] [0-9a-fA-F] [0-9a-fA-F]))",
    [],
)
_YEAR = '([0-9] [0-9] [0-9] [1-9] | [0-9] [0-9] [1-9] "0" | [0-9] [1-9] "00" | [1-9] "000")'
_LEAP = '([0-9] [0-9] ("0" [48] | [2468] [048] | [13579] [26]) | ("0" [48] | [2468] [048] | [13579] [26]) "00")'
_MONTH_DAY = (
    '(("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])'
    ' | ("0" [469] | "11") "-" ("0" [1-9] | [12] [0-9] | "30")'
    ' | "02-" ("0" [1-9] | "1" [0-9] | "2" [0-8]))'
)
_DATE = f'{_LEAP} "-02-29" | {_YEAR} "-" {_MONTH_DAY}'
# Names the converter's built-in rules refer to by name: no other rule may take one of them.
_FIXED = frozenset(
    "space char string value object array number integer boolean null integral-part decimal-part date time".split()
    + ["date-time"]
)


class _Converter(lg.SchemaConverter):  # untyped upstream: calls into it carry no-untyped-call
    """llama-cpp-python's converter with the repairs the module docstring lists."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)  # type: ignore[no-untyped-call]
        self._in_primitive = 0

    def _format_literal(self, literal: str) -> str:
        escaped = literal.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r").replace("\n", "\\n")
        return f'"{escaped}"'

    def _add_rule(self, name: str, rule: str) -> str:
        # A property called "decimal part" must not take the name the number rule refers to.
        if not self._in_primitive and lg.INVALID_RULE_CHARS_RE.sub("-", name) in _FIXED:
            name += "-"
        return str(super()._add_rule(name, rule))  # type: ignore[no-untyped-call]

    def _add_primitive(self, name: str, rule: Any) -> str:
        self._in_primitive += 1
        try:
            return str(super()._add_primitive(name, _CHAR if name == "char" else rule))
        finally:
            self._in_primitive -= 1

    def visit(self, schema: dict[str, Any], name: str) -> str:
        fmt = schema.get("format")
        if fmt not in ("date", "date-time"):
            return str(super().visit(schema, name))  # type: ignore[no-untyped-call]
        self._in_primitive += 1
        try:
            inner = self._add_rule("date", _DATE)
            if fmt == "date-time":
                time = self._add_primitive("time", lg.STRING_FORMAT_RULES["time"])
                inner = self._add_rule("date-time", f'{inner} "T" {time}')
        finally:
            self._in_primitive -= 1
        rule_name = name + "-" if name in lg.RESERVED_NAMES else name or "root"
        return self._add_rule(rule_name, f'"\\"" {inner} "\\"" space')


def schema_to_gbnf(plain: dict[str, Any]) -> str:
    """GBNF for a schema that ``check_schema`` returned; InvalidRequest if the converter still fails."""
    converter = _Converter()
    try:
        converter.visit(json.loads(json.dumps(plain)), "")
        text = str(converter.format_grammar())  # type: ignore[no-untyped-call]
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise InvalidRequest(f"The JSON schema could not be turned into a grammar ({type(exc).__name__}).") from None
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"The JSON schema needs a grammar over {MAX_GRAMMAR_CHARS} characters; simplify it.")
    return text


def compile_grammar(vocab: Any, text: str) -> Any:
    """A native grammar sampler (free it with llama_sampler_free); InvalidRequest when llama.cpp refuses the text."""
    sampler = ll.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
    if not sampler:
        raise InvalidRequest("The grammar for this JSON schema does not compile in llama.cpp.")
    return sampler


def free_sampler(sampler: Any) -> None:
    """Release a native sampler."""
    ll.llama_sampler_free(sampler)


def _apply(sampler: Any, cand: Any, is_sorted: bool = False) -> int:
    """Run a native sampler over candidates in place; the index it selected (-1: none)."""
    arr = ll.llama_token_data_array(cand.ctypes.data_as(ll.llama_token_data_p), len(cand), -1, is_sorted)
    ll.llama_sampler_apply(sampler, ctypes.byref(arr))
    return int(arr.selected)


def _candidates(ids: Any, values: Any) -> Any:
    cand = np.empty(len(ids), dtype=TOKEN_DATA)
    cand["id"] = ids
    cand["logit"] = values[ids]
    cand["p"] = 0.0
    return cand


# Well-formed UTF-8 (Unicode table 3-7): lead byte range -> (continuation bytes, range of the first one).
_LEADS = (
    (0xC2, 0xDF, 1, 0x80, 0xBF),
    (0xE0, 0xE0, 2, 0xA0, 0xBF),
    (0xE1, 0xEC, 2, 0x80, 0xBF),
    (0xED, 0xED, 2, 0x80, 0x9F),
    (0xEE, 0xEF, 2, 0x80, 0xBF),
    (0xF0, 0xF0, 3, 0x90, 0xBF),
    (0xF1, 0xF3, 3, 0x80, 0xBF),
    (0xF4, 0xF4, 3, 0x80, 0x8F),
)


def utf8_tail(data: bytes) -> bytes | None:
    """The unfinished last character of ``data`` (b"" when none); None when ``data`` is not well-formed UTF-8.

    Python's incremental decoder is no help here: it accepts ``ED B3`` (a surrogate) until a
    third byte arrives.
    """
    try:
        data.decode("utf-8")
        return b""
    except UnicodeDecodeError:
        pass
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            i += 1
            continue
        lead = next((x for x in _LEADS if x[0] <= b <= x[1]), None)
        if lead is None:
            return None
        _, _, need, lo, hi = lead
        for k in range(1, need + 1):
            if i + k >= n:
                return data[i:]
            c = data[i + k]
            if not (lo <= c <= hi if k == 1 else 0x80 <= c <= 0xBF):
                return None
        i += need + 1
    return b""


@dataclass(frozen=True)
class VocabIndex:
    """What sampling under a grammar needs to know about a vocabulary; built once per model."""

    clean: Any  # clean[token]: its piece may follow complete UTF-8 text
    starts: list[Any]  # starts[b]: the tokens whose piece starts with byte b
    probes: Any  # probes[b]: a token whose piece is exactly byte b, or -1
    bare: Any  # tokens with an empty piece (end of generation, control tokens): the grammar judges them alone
    # First bytes opening over SPLIT tokens: seconds[b][c], those whose second byte is c ([256]: b alone).
    seconds: dict[int, list[Any]]


def build_index(pieces: Sequence[bytes]) -> VocabIndex:
    """The index of a vocabulary, from every token's piece in id order."""
    n = len(pieces)
    clean = np.fromiter((utf8_tail(p) is not None for p in pieces), dtype=bool, count=n)
    first = np.fromiter((p[0] if p else -1 for p in pieces), dtype=np.int32, count=n)
    order = np.argsort(first, kind="stable").astype(np.int32)
    bounds = np.searchsorted(first[order], np.arange(-1, 257))
    probes = np.full(256, -1, dtype=np.int32)
    for token, piece in enumerate(pieces):
        if len(piece) == 1 and probes[piece[0]] < 0:
            probes[piece[0]] = token
    starts = [order[bounds[b + 1] : bounds[b + 2]] for b in range(256)]
    seconds = {}
    for b, group in enumerate(starts):
        if len(group) > SPLIT:
            second = np.fromiter((pieces[t][1] if len(pieces[t]) > 1 else 256 for t in group), np.int32, len(group))
            seconds[b] = [group[second == c] for c in range(257)]
    return VocabIndex(clean, starts, probes, order[bounds[0] : bounds[1]], seconds)


class GrammarChain:
    """One request's sampling under a grammar, grammar first: the rest of its chain sees only legal tokens.

    Masking all 262,144 candidates of Gemma's vocabulary costs 50 to 500 ms a token, so the 64
    best candidates are masked first. That settles it when the chain's top-k (1 when greedy)
    are among them, since top-k keeps only the k best legal tokens, or when every other token
    lies below min-p's cut (``min_p`` times the best legal token's probability). Otherwise the
    grammar allows few tokens here (a key's next character, a digit), and all of them are found
    among the tokens that start with a byte it can take next (asked of one single-byte token per
    byte): every legal token starts with such a byte. Either way the rest of the chain sees
    exactly the legal tokens it would after masking the whole vocabulary.

    Legal also means the bytes stay valid UTF-8. llama.cpp's grammar decodes a byte token's
    partial character without checking continuation bytes, so after a lone ``<0xF0>`` it would
    take a ``"`` as part of that character while every JSON parser sees the string end there.
    """

    def __init__(
        self,
        vocab: Any,
        text: str,
        penalties: Any,
        chain: Any,
        keep: int,
        min_p: float,
        eog: int,
        piece: Callable[[int], bytes],
        index: VocabIndex,
    ) -> None:
        self.n_vocab, self.keep, self.eog = len(index.clean), keep, eog
        self.gap = math.log(min_p) if min_p > 0 else -math.inf  # logits this far below the best legal: never drawn
        self.penalties, self.chain = penalties, chain  # penalties: None, or applied before the grammar
        self.piece, self.index = piece, index
        self.pending = b""  # the output's unfinished last character (byte tokens spell some characters)
        try:
            self.grammar = compile_grammar(vocab, text)  # checked before the request was queued
        except InvalidRequest:
            self.free_chain()
            raise

    def sample(self, ctx: Any, index: int) -> int:
        """Sample and accept the next token from the logits at a batch index."""
        n = self.n_vocab
        values = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, index), shape=(n,))
        if self.penalties is not None:
            full = _candidates(np.arange(n, dtype=np.int32), values)
            _apply(self.penalties, full)  # in place, order kept: full["logit"] is indexed by token id
            values = full["logit"]
        legal = self._best_legal(values)
        if len(legal) == 0:  # the grammar allows no token at all: end rather than emit an illegal one
            return self.eog
        pick = np.ascontiguousarray(legal[: self.keep])
        token = int(pick["id"][_apply(self.chain, pick, is_sorted=True)])
        self.accept(token)
        return token

    def accept(self, token: int) -> None:
        """Move the grammar, penalties and chain past ``token`` (a legal one)."""
        self.pending = utf8_tail(self.pending + self.piece(token)) or b""
        ll.llama_sampler_accept(self.grammar, token)
        if self.penalties is not None:
            ll.llama_sampler_accept(self.penalties, token)
        ll.llama_sampler_accept(self.chain, token)

    def _best_legal(self, values: Any) -> Any:
        """The legal candidates, best first: the ``keep`` best, or every one that could still be drawn."""
        n = self.n_vocab
        if self.keep == 1:  # greedy: the best token is usually legal, and argmax is cheap
            first = self._legal(_candidates(np.array([int(np.argmax(values))], dtype=np.int32), values))
            if len(first):
                return first
        look = min(n, max(FIRST_LOOK, 2 * self.keep))
        top = np.argpartition(values, n - look)[n - look :] if look < n else np.arange(n)
        ids = top[np.argsort(-values[top], kind="stable")]
        legal = self._legal(_candidates(ids, values))
        if len(legal) >= self.keep or look >= n or len(legal) and values[ids[-1]] < legal["logit"][0] + self.gap:
            return legal
        legal = self._legal(_candidates(self._openers(), values))
        return legal[np.argsort(-legal["logit"], kind="stable")]

    def _openers(self) -> Any:
        """Every token whose first bytes the grammar can take next (so every legal token, and some more)."""
        index = self.index
        parts = [index.bare]
        for b in self._next_bytes(self.grammar):
            if b not in index.seconds or index.probes[b] < 0:
                parts.append(index.starts[b])
                continue
            after = ll.llama_sampler_clone(self.grammar)  # the grammar one byte on, to ask about the second
            try:
                ll.llama_sampler_accept(after, int(index.probes[b]))
                parts += [index.seconds[b][c] for c in self._next_bytes(after)]
            finally:
                ll.llama_sampler_free(after)
            parts.append(index.seconds[b][256])
        return np.concatenate(parts)

    def _next_bytes(self, grammar: Any) -> list[int]:
        """The bytes ``grammar`` can take next, asked of one single-byte token each (all, where a byte has none)."""
        index = self.index
        have = np.nonzero(index.probes >= 0)[0]
        probe = np.zeros(len(have), dtype=TOKEN_DATA)
        probe["id"] = index.probes[have]
        _apply(grammar, probe)
        return [int(b) for b in have[probe["logit"] > -np.inf]] + [int(b) for b in np.nonzero(index.probes < 0)[0]]

    def _legal(self, cand: Any) -> Any:
        """The candidates the grammar allows and that keep the output valid UTF-8, order kept."""
        _apply(self.grammar, cand)
        legal = cand[cand["logit"] > -np.inf]
        if not self.pending:  # between characters, as almost always: a table lookup
            return legal[self.index.clean[legal["id"]]]
        # Inside a character split over byte tokens: only what continues it correctly.
        ok = [utf8_tail(self.pending + self.piece(t)) is not None for t in legal["id"].tolist()]
        return legal[np.array(ok, dtype=bool)]

    def free_chain(self) -> None:
        """Release the chain and penalties samplers."""
        if self.penalties is not None:
            ll.llama_sampler_free(self.penalties)
        ll.llama_sampler_free(self.chain)

    def free(self) -> None:
        """Release every native sampler."""
        ll.llama_sampler_free(self.grammar)
        self.free_chain()
