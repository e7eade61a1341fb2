"""One packed ``llama_decode`` batch as the scheduler builds it: tokens, positions, sequence ids, logits wanted."""

from __future__ import annotations

from itertools import groupby


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

    def ubatches(self, n_ubatch: int) -> int:
        """How many micro-batches llama.cpp splits this batch into with per-sequence KV streams.

        Its ``split_equal(sequential=true)`` takes, in batch order, the first sequence with tokens
        left and then only the sequence whose id is one more than the last one taken, and from each
        of them as many tokens as the shortest has left. So sequences 0, 2 and 5 decode as three
        micro-batches (each reading all the weights), 0 to 5 as one when every id between is there.
        """
        runs = [(s, len(list(g))) for s, g in groupby(self.seqs)]  # (sequence id, tokens), batch order
        left = [n for _, n in runs]
        ids = [s for s, _ in runs]
        count = 0
        while True:
            chain: list[int] = []
            for i, n in enumerate(left):
                if n and (not chain or ids[i] == ids[chain[-1]] + 1):
                    chain.append(i)
            if not chain:
                return count
            take = max(1, min(min(left[i] for i in chain), n_ubatch // len(chain)))
            for i in chain:
                left[i] -= min(take, left[i])
            count += 1
