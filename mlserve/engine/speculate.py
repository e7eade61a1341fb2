"""Prompt-lookup speculative decoding: drafts from a sequence's own tokens, and how many pay.

A clinical note repeats its dialogue (names, drugs, doses, phrases), so the tokens that
followed the latest n-gram (3, else 2, else 1 tokens) where it last occurred in the prompt or
the output are a cheap guess at what comes next. The scheduler verifies the guess in the
shared batch: the sequence's last token plus the drafts, with logits at each, and it samples
at each position in turn while the sample equals the draft. Every sample is an emitted
token drawn from the model's distribution given the tokens before it, so the output is the
one decoding token by token would give (greedy: the same argmax; seeded: the same draws,
one per emitted token), up to batch-size numerics. Rejected positions leave the KV cache.

How many drafts a step verifies follows each stream's measured acceptance. In a step of
streams alone (``draft_len``) it also follows the measured step cost: the length that makes the
most tokens per millisecond, 0 when none beats the plain step, so a full batch, where a step is
already efficient, seldom drafts. In a step that carries a newcomer's prompt chunk, the step
runs to its time target anyway, so drafts take up to half of it (``likely_len``): the streams
keep their pace in tokens, and the prompt gets the other half.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlserve.engine.prefill import StepCost

NGRAM_MAX = 3
NGRAM_MIN = 1
DECAY = 0.9  # weight of past verifications in the acceptance estimate
IDLE_DECAY = 0.97  # steps without drafts pull the estimate back toward the prior, so it probes again
# Prior acceptance, as pseudo-counts (0.7 over 2 verifications): hopeful enough that a stream tries
# one draft on Gemma, whose output layer makes every verified position cost two-thirds of a step.
PRIOR_ACCEPTED, PRIOR_SEEN = 1.4, 2.0
LIKELY = 0.5  # beside a prompt chunk, a draft position is verified while its acceptance is at least this


@dataclass
class Drafter:
    """One sequence's token history, its n-gram index and its acceptance estimate."""

    history: list[int]
    accepted: float = 0.0  # decayed count of accepted drafts
    rejected: float = 0.0  # decayed count of verifications that ended in a rejection
    _seen: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> index of its last token
    _upto: int = 0  # n-grams ending before this index are in ``_seen``

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest occurrence of the history's last n-gram."""
        hist = self._index()
        n_hist = len(hist)
        for n in range(min(NGRAM_MAX, n_hist), NGRAM_MIN - 1, -1):
            at = self._seen.get(tuple(hist[n_hist - n :]))
            if at is not None:
                return hist[at + 1 : at + 1 + k]
        return []

    def _index(self) -> list[int]:
        """Index every n-gram that ends before the last token (the last one is what we look up)."""
        hist, seen = self.history, self._seen
        for end in range(self._upto, len(hist) - 1):
            for n in range(NGRAM_MIN, min(NGRAM_MAX, end + 1) + 1):
                seen[tuple(hist[end - n + 1 : end + 1])] = end
        self._upto = max(self._upto, len(hist) - 1)
        return hist

    @property
    def rate(self) -> float:
        """Estimated chance that a draft token is accepted, given the ones before it were (prior 0.7)."""
        return (self.accepted + PRIOR_ACCEPTED) / (self.accepted + self.rejected + PRIOR_SEEN)

    def verified(self, n_accepted: int, n_drafted: int) -> None:
        """Fold in one verification: ``n_accepted`` of ``n_drafted`` drafts agreed with the model."""
        self.accepted = self.accepted * DECAY + n_accepted
        self.rejected = self.rejected * DECAY + (1.0 if n_accepted < n_drafted else 0.0)

    def idle(self) -> None:
        """A step without drafts: forget a little, so a sequence that stopped paying is tried again."""
        self.accepted *= IDLE_DECAY
        self.rejected *= IDLE_DECAY


def draft_len(rates: list[float], lefts: list[int], n_streams: int, cost: StepCost, k_max: int) -> int:
    """The draft length, one for every drafting stream, that makes the most tokens per millisecond.

    ``rates``: each drafting stream's acceptance estimate; ``lefts``: the tokens each may still
    verify before max_tokens. The i-th draft of a stream is accepted with probability rate**i,
    and every draft costs a token and a logits row (``cost.ms_token + cost.ms_logits``); 0 when
    no length beats the plain step. One length for all keeps the step one llama.cpp micro-batch:
    runs of unequal length split it into several, each reading the weights again.
    """
    best_k, best = 0, n_streams / max(cost.predict(1, n_streams, n_streams), 1e-3)
    for k in range(1, k_max + 1):
        gain = n_streams + sum(_expected(rate, min(k, left)) for rate, left in zip(rates, lefts, strict=True))
        n = n_streams + k * len(rates)
        speed = gain / max(cost.predict(1, n, n), 1e-3)
        if speed > best:
            best_k, best = k, speed
    return best_k


def likely_len(rates: list[float], k_max: int) -> int:
    """The longest draft whose last token the median drafting stream more likely keeps than not."""
    rate = sorted(rates)[len(rates) // 2]
    k, p = 0, rate
    while k < k_max and p >= LIKELY:
        k += 1
        p *= rate
    return k


def _expected(rate: float, k: int) -> float:
    """Expected accepted drafts of ``k`` when each is accepted with ``rate`` given the ones before."""
    return sum(rate**i for i in range(1, k + 1))
