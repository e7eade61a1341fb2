"""Chunked prefill: how many prompt tokens a step may take so running streams keep their pace.

A step's cost is modelled from what the scheduler measures (``StepCost``): llama.cpp splits a
batch into micro-batches of equal-length runs of consecutive sequence ids (``Batch.ubatches``),
and each micro-batch reads all the weights again; every token costs its layers; and every token
whose logits are asked for costs the output layer again (262,144 rows for Gemma 3: as much as a
token's layers). So a call costs ``ms_ubatch`` per micro-batch, ``ms_token`` per token and
``ms_logits`` per logits row, fitted online (least squares with forgetting) from every call's
time. With streams running, a step takes the prompt tokens that keep it under ``max_step_ms``;
with none, a full batch (prefill is then as efficient as it gets). However many streams run,
waiting prompts get at least their fair share of a step (each as much time as one stream's
token; the step then runs up to a quarter past the target), so a crowd of newcomers is not held
to a sliver of each step behind a few streams. Prompts nearest their end go first, and one that
almost fits is finished in the same step, so a newcomer's first token is not held back by a
sliver of prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORGET = 0.95  # weight of the past in the fit: adapts within tens of steps, smooths one-off jitter
MIN_CHUNK = 8  # prompt tokens a step takes at least, so a prompt always advances under any load
FINISH_SLACK = 0.25  # a prompt whose rest is within budget * (1 + slack) is finished in one step
STRETCH = 1.25  # a step may run this far past the target to give waiting prompts their fair share
# Starting calls (Gemma 3 270M Q4_K_M, 2 threads, measured with benchmarks/clinical.py's machine):
# (micro-batches, tokens, logits rows, ms). They always weigh as PRIOR_WEIGHT calls, so where the
# measured calls cannot tell the terms apart (a lone stream: every call 1, 1, 1) the fit keeps their
# split and scales it to the measurements, instead of picking any split that fits.
PRIOR_CALLS = ((1, 1, 1, 18.6), (1, 9, 1, 64.5), (1, 9, 9, 111.4))
PRIOR_WEIGHT = 0.5


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when the system is (nearly) singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    scale = max(abs(v) for row in a for v in row) or 1.0
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-6 * scale:
            return None
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


_PRIOR_FIT = (6.9, 5.7, 5.9)  # what PRIOR_CALLS solve to: ms per micro-batch, token, logits row


@dataclass
class StepCost:
    """A running fit of what one ``llama_decode`` costs: per micro-batch, per token, per logits row."""

    ms_ubatch: float = 6.9
    ms_token: float = 5.7
    ms_logits: float = 5.9
    _xx: list[list[float]] = field(default_factory=lambda: [[0.0] * 3 for _ in range(3)])
    _xy: list[float] = field(default_factory=lambda: [0.0] * 3)

    def _add(self, x: tuple[int, int, int], ms: float, w: float = 1.0) -> None:
        for i in range(3):
            self._xy[i] += w * x[i] * ms
            for j in range(3):
                self._xx[i][j] += w * x[i] * x[j]

    def observe(self, ubatches: int, tokens: int, logits: int, ms: float) -> None:
        """Fold in one measured call: ``ubatches`` micro-batches, ``tokens`` tokens, ``logits`` rows."""
        for i in range(3):
            self._xy[i] *= FORGET
            for j in range(3):
                self._xx[i][j] *= FORGET
        self._add((ubatches, tokens, logits), ms)
        xx = [row[:] for row in self._xx]
        xy = self._xy[:]
        for u, t, n_logits, prior_ms in PRIOR_CALLS:  # scaled to this model's speed: only their split counts
            x, scale = (u, t, n_logits), self._speed()
            for i in range(3):
                xy[i] += PRIOR_WEIGHT * x[i] * prior_ms * scale
                for j in range(3):
                    xx[i][j] += PRIOR_WEIGHT * x[i] * x[j]
        fit = _solve(xx, xy)
        if fit is not None and fit[0] >= 0 and fit[1] > 0 and fit[2] >= 0:
            self.ms_ubatch, self.ms_token, self.ms_logits = fit

    def _speed(self) -> float:
        """How much slower than the prior calls the calls seen lately were (1: as fast)."""
        predicted = sum(self._xx[i][j] * _PRIOR_FIT[j] for i in range(3) for j in range(3))
        measured = sum(self._xy)
        return measured / predicted if predicted > 0 else 1.0

    def predict(self, ubatches: int, tokens: int, logits: int) -> float:
        """Expected milliseconds of one call."""
        return ubatches * self.ms_ubatch + tokens * self.ms_token + logits * self.ms_logits

    def budget(self, ubatches: int, tokens: int, logits: int, max_step_ms: float, per_token: float) -> int:
        """Further tokens (costing ``per_token`` ms each) a call may take and stay under ``max_step_ms``."""
        room = max_step_ms - self.predict(ubatches, tokens, logits)
        return max(0, int(room / max(per_token, 1e-3)))


def plan_prefill(remaining: list[int], budget: int, room: int, floors: list[int] | None = None) -> list[int]:
    """Prompt tokens to take from each prefilling sequence (same order as ``remaining``).

    ``budget``: tokens the time target allows; ``room``: tokens left in the batch (hard limit).
    Each first takes up to its ``floors`` entry (the batch's room allowing), then the rest goes
    shortest rest first; a rest within ``FINISH_SLACK`` of the budget is taken whole.
    """
    takes = [0] * len(remaining)
    for i, rest in enumerate(remaining):
        takes[i] = min(rest, floors[i] if floors else 0, room)
        room -= takes[i]
    left = min(budget - sum(takes), room)
    for i in sorted(range(len(remaining)), key=lambda j: remaining[j]):
        if left <= 0:
            break
        rest = remaining[i] - takes[i]
        stretch = min(room, int(left * (1 + FINISH_SLACK)))
        take = rest if rest <= stretch else min(rest, left)
        takes[i] += take
        left -= take
        room -= take
    return takes


def prompt_budget(
    cost: StepCost, n_decode: int, n_extra: int, max_step_ms: float, room: int, n_waiting: int = 1
) -> int:
    """Prompt tokens for this step: a full batch when no stream runs, else what the target leaves.

    ``n_decode`` streams and ``n_extra`` drafts are in the call already, all with logits; a prompt
    chunk beside them is a second micro-batch (its run is longer than theirs). At least
    ``MIN_CHUNK``, and at least the waiting prompts' fair share (``fair_share_ms``): where many
    prompts wait beside few streams, the step runs past the target (up to ``STRETCH`` times it).
    """
    if n_decode == 0:
        return room
    n = n_decode + n_extra
    fill = cost.budget(2, n, n, max_step_ms, cost.ms_token)
    fair = int(fair_share_ms(cost, n_decode, n_waiting, max_step_ms) / max(cost.ms_token, 1e-3))
    return min(room, max(MIN_CHUNK, fill, fair))


def fair_share_ms(cost: StepCost, n_decode: int, n_waiting: int, max_step_ms: float) -> float:
    """The time a step owes ``n_waiting`` prompts beside ``n_decode`` streams: as much each as a stream's token.

    Every request in the server gets an equal part of the step: a stream its next token (its
    share of one micro-batch, its row and its logits), a waiting prompt as long a chunk; but the
    step runs at most ``STRETCH`` times the target. Without it, six prompts waiting beside two
    streams got 16 tokens a 100 ms step, a third of their speed alone, and the streams ran short
    of company: fewer streams per step, more steps, later first tokens.
    """
    if n_decode == 0 or n_waiting == 0:
        return 0.0
    owed = n_waiting / n_decode * cost.predict(1, n_decode, n_decode)
    return max(0.0, min(owed, STRETCH * max_step_ms - cost.predict(2, n_decode, n_decode)))
