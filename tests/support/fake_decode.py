"""A deterministic stand-in for ``LlamaModel`` behind the scheduler's ``DecodeModel`` protocol.

The next token is a function of the token decoded at a batch index and its position
(``next_token``; by default ``token + 1``), pieces are known byte strings, and the model
keeps real per-sequence KV bookkeeping: it asserts every decoded position extends its
sequence's cells without a gap, so a scheduler that loses track of positions fails loudly.
Failures are scripted: ``fail_at`` (call index -> rc), ``fail_when`` (a predicate on the
batch), ``max_tokens`` (rc 1 for bigger batches, like a cache with no room) and ``raise_at``.
Time is simulated: each decode advances ``now`` by ``ms_fixed`` per micro-batch (``split``:
llama.cpp's split with per-sequence KV streams, token by token) plus ``ms_per_token`` per
token (``clock`` reads it), so the scheduler's step-cost policy is tested without sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlserve.engine.decode import DecodeError


def split(seqs: list[int], n_ubatch: int) -> list[list[int]]:
    """The micro-batches (batch indices) llama.cpp's ``split_equal(sequential=true)`` makes of a batch.

    Token by token in batch order: the first unused token's sequence, then only a sequence whose
    id is one more than the last taken; then the same number of tokens from each, as many as the
    one with fewest unused has left (at most ``n_ubatch`` in all).
    """
    used = [False] * len(seqs)
    out: list[list[int]] = []
    while not all(used):
        chain: list[int] = []
        for i, s in enumerate(seqs):
            if not used[i] and s not in chain and (not chain or s == chain[-1] + 1):
                chain.append(s)
        todo = {s: [i for i, t in enumerate(seqs) if t == s and not used[i]] for s in chain}
        take = max(1, min(min(len(v) for v in todo.values()), n_ubatch // len(chain)))
        ubatch = [i for s in chain for i in todo[s][:take]]
        for i in ubatch:
            used[i] = True
        out.append(ubatch)
    return out


@dataclass(frozen=True)
class Call:
    """One decode call as the scheduler made it."""

    tokens: list[int]
    pos: list[int]
    seqs: list[int]
    want: list[bool]
    rc: int = 0


@dataclass
class FakeSampler:
    """Only tracks that it is freed exactly once."""

    cfg: Any
    freed: bool = False


@dataclass
class FakeDecodeModel:
    """A fake model with ``n_seq`` sequences; everything it did is in ``calls``."""

    n_seq: int = 2
    n_batch: int = 64
    n_swa: int = 0
    n_vocab: int = 1000
    eog: frozenset[int] = frozenset({999})
    pieces: dict[int, bytes] = field(default_factory=dict)
    next_token: Callable[[int, int], int] = lambda token, pos: token + 1
    fail_at: dict[int, int] = field(default_factory=dict)
    fail_when: Callable[[Call], int] | None = None
    max_tokens: int | None = None
    raise_at: dict[int, BaseException] = field(default_factory=dict)
    gate: threading.Event | None = None  # when set up, decode waits until it is set
    entered: threading.Event = field(default_factory=threading.Event)  # set as each decode begins
    calls: list[Call] = field(default_factory=list)
    cells: dict[int, list[int]] = field(default_factory=dict)
    samplers: list[FakeSampler] = field(default_factory=list)
    floor: dict[int, int] = field(default_factory=dict)  # sliding window: positions below are pruned
    ms_fixed: float = 20.0  # simulated cost of one micro-batch ...
    ms_per_token: float = 4.0  # ... plus this per token in it ...
    ms_per_logits: float = 0.0  # ... plus this per token whose logits are wanted
    now: float = 0.0  # simulated seconds
    step_ms: list[float] = field(default_factory=list)  # the simulated cost of each successful decode
    _last: Call | None = None

    # -- DecodeModel ---------------------------------------------------------------
    def decode(self, tokens: list[int], pos: list[int], seqs: list[int], want: list[bool]) -> None:
        """Record the call, apply a scripted failure or extend each sequence's cells."""
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "decode gate never opened"
        call = Call(list(tokens), list(pos), list(seqs), list(want))
        index = len(self.calls)
        assert 0 < len(tokens) <= self.n_batch and len(tokens) == len(pos) == len(seqs) == len(want)
        rc = self.fail_at.get(index, 0)
        if not rc and self.fail_when is not None:
            rc = self.fail_when(call)
        if not rc and self.max_tokens is not None and len(tokens) > self.max_tokens:
            rc = 1
        self.calls.append(Call(call.tokens, call.pos, call.seqs, call.want, rc))
        if index in self.raise_at:
            raise self.raise_at[index]
        if rc:
            self._last = None
            raise DecodeError(rc, len(tokens))
        for p, s in zip(pos, seqs, strict=True):
            held = self.cells.setdefault(s, [])
            assert 0 <= s < self.n_seq, f"sequence id {s} out of range"
            assert p == len(held), f"sequence {s}: position {p} decoded after {len(held)} cells"
            held.append(p)
            if self.n_swa:
                self.floor[s] = max(self.floor.get(s, 0), p + 1 - self.n_swa)
        self._last = call
        ubatches = len(split(seqs, self.n_batch))
        cost = self.ms_fixed * ubatches + self.ms_per_token * len(tokens) + self.ms_per_logits * sum(want)
        self.now += cost / 1000
        self.step_ms.append(cost)

    def clock(self) -> float:
        """Simulated seconds (pass as the scheduler's clock)."""
        return self.now

    def new_sampler(self, cfg: Any) -> FakeSampler:
        """A sampler record."""
        sampler = FakeSampler(cfg)
        self.samplers.append(sampler)
        return sampler

    def sample(self, sampler: FakeSampler, index: int) -> int:
        """``next_token`` of the token at ``index`` of the last successful decode."""
        assert not sampler.freed
        last = self._last
        assert last is not None and last.want[index], "sampled a batch index without logits"
        return self.next_token(last.tokens[index], last.pos[index])

    def free_sampler(self, sampler: FakeSampler) -> None:
        """Mark a sampler freed (twice is a bug)."""
        assert not sampler.freed, "sampler freed twice"
        sampler.freed = True

    def clear_seq(self, seq: int, p0: int = -1) -> bool:
        """Drop cells from ``p0`` on."""
        held = self.cells.setdefault(seq, [])
        del held[max(p0, 0) :]
        if not held or self.floor.get(seq, 0) >= len(held):
            held.clear()
            self.floor.pop(seq, None)
        return True

    def seq_pos_min(self, seq: int) -> int:
        """Smallest cached position, or -1; sliding windows keep only the last n_swa cells."""
        held = self.cells.get(seq, [])
        return self.floor.get(seq, 0) if held else -1

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` is one of ``eog``."""
        return token in self.eog

    def piece(self, token: int) -> bytes:
        """``pieces[token]``, else ``<token>``."""
        return self.pieces.get(token, f"<{token}>".encode())

    # -- what LlamaEngine needs besides ------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """One token per byte (plus 1 as BOS)."""
        return ([1] if add_special else []) + [10 + b for b in text.encode()]

    def meta(self, key: str) -> str | None:
        """No metadata."""
        return None

    def special_tokens(self) -> dict[str, str]:
        """bos/eos text."""
        return {"bos_token": "<s>", "eos_token": "</s>"}

    def add_bos(self) -> bool:
        """The fake adds BOS itself."""
        return True

    def close(self) -> None:
        """Nothing to free."""

    # -- for assertions ---------------------------------------------------------------
    def live_samplers(self) -> int:
        """Sampler chains not yet freed."""
        return sum(not s.freed for s in self.samplers)
