"""The KV sequence slots of one context, and the prompt prefixes their cells still hold.

A free slot keeps the tokens it last held. A new request takes the free slot whose cached
tokens share the longest prefix with its prompt, drops the cells after that prefix and decodes
only the rest. On sliding-window models (Gemma 3) cells older than the window are gone once a
sequence runs past it; ``seq_pos_min`` tells whether the prefix is still whole, and if not the
slot is cleared and the prompt decoded in full. Deterministic requests never reuse a prefix.
"""

from __future__ import annotations

from mlserve.engine.api import StepStats
from mlserve.engine.decode import DecodeModel

MIN_REUSE = 16  # shared prompt tokens that make a slot worth choosing over the lowest free one


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Slots:
    """Which sequence ids are free, and what each free one still caches (engine thread only)."""

    def __init__(self, model: DecodeModel, stats: StepStats) -> None:
        self.model = model
        self.stats = stats
        self._free = list(range(model.n_seq - 1, -1, -1))
        self._cached: dict[int, list[int]] = {}  # free slot -> tokens still in its KV cells

    def available(self) -> bool:
        """Whether a slot is free."""
        return bool(self._free)

    def take(self, prompt: list[int], deterministic: bool) -> tuple[int, int]:
        """A free slot for ``prompt`` and how many of its tokens are already cached there."""
        shared = {slot: _common_prefix(self._cached.get(slot, []), prompt) for slot in self._free}
        # Longest shared prefix first; on a tie, a slot with nothing cached, so other caches live on.
        slot = max(self._free, key=lambda s: (shared[s], s not in self._cached, -s))
        if deterministic:  # no reuse; a high id keeps the batched ones dense below it
            slot = max(self._free, key=lambda s: (s not in self._cached, s))
            shared[slot] = 0
        elif shared[slot] < MIN_REUSE:
            # Nothing worth reusing: take the lowest free slot, so active sequence ids stay
            # dense (llama.cpp's per-sequence KV streams batch only consecutive ids together).
            slot = min(self._free)
        self._free.remove(slot)
        self._cached.pop(slot, None)
        reuse = min(shared[slot], len(prompt) - 1)
        if reuse > 0 and self.model.clear_seq(slot, reuse) and self._prefix_whole(slot, reuse):
            self.stats.prefix_hits += 1
            self.stats.prefix_tokens_reused += reuse
            return slot, reuse
        self.model.clear_seq(slot)
        return slot, 0

    def _prefix_whole(self, slot: int, reuse: int) -> bool:
        """Whether every cell the next token attends to is still cached (sliding windows prune)."""
        pos_min = self.model.seq_pos_min(slot)
        return 0 <= pos_min <= max(0, reuse - self.model.n_swa) if self.model.n_swa > 0 else pos_min == 0

    def give_back(self, slot: int, cells: list[int] | None) -> None:
        """Free ``slot``; ``cells`` are the tokens its cells hold (None: not trusted, cleared)."""
        if cells is not None:
            self._cached[slot] = cells  # the next request with the same prefix reuses them
        else:
            self.model.clear_seq(slot)
        self._free.append(slot)
