"""One packed ``llama_decode`` batch as the scheduler builds it: tokens, positions, sequence ids, logits wanted."""

from __future__ import annotations


class Batch:
    """Runs of consecutive positions of one sequence each, appended in order."""

    __slots__ = ("tokens", "pos", "seqs", "want")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.pos: list[int] = []
        self.seqs: list[int] = []
        self.want: list[bool] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, seq: int, tokens: list[int], start: int, *, logits: bool, last: bool = False) -> int:
        """Append ``tokens`` of sequence ``seq`` at positions from ``start``; return the run's first index.

        ``logits``: logits at every token of the run; ``last``: at its last token only.
        """
        at = len(self.tokens)
        n = len(tokens)
        self.tokens.extend(tokens)
        self.pos.extend(range(start, start + n))
        self.seqs.extend([seq] * n)
        self.want.extend([logits] * n)
        if last and n and not logits:
            self.want[-1] = True
        return at
