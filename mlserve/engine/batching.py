"""One batched step of the scheduler: its decode calls, what they verify and sample, and recovery.

``BatchedSteps`` is the part of ``Scheduler`` that packs a step: every generating sequence's
last token, with prompt-lookup drafts to verify where they pay (``speculate.py``), then
prompt chunks sized by the step-time target (``prefill.py``), in one ``llama_decode``, runs in
ascending sequence id (llama.cpp batches only consecutive ids in one micro-batch). After
the call each sequence samples at its last token and at each draft while the sample equals
the draft; rejected drafts' cells leave its KV stream at once, so nothing of them is ever
attended to, by it or by another sequence (each has its own sequence id).

Decode errors: "no KV slot" (rc 1) is retried without drafts, then with a smaller batch, down
to one sequence, which alone then fails; any other code fails the sequences in that batch.
The engine dies only when the model raises something else, or decodes keep failing
(``FATAL_AFTER``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

from mlserve.engine.api import BATCH_BUCKETS, Event, GenerationFailed, GenerationRequest, RequestError, StepStats
from mlserve.engine.batch import Batch
from mlserve.engine.decode import NO_KV_SLOT, DecodeError, DecodeModel
from mlserve.engine.prefill import MIN_CHUNK, StepCost, fair_share_ms, plan_prefill, prompt_budget
from mlserve.engine.speculate import Drafter, draft_len, likely_len
from mlserve.engine.stops import TextOut
from mlserve.engine.tuning import Tuning

FATAL_AFTER = 4  # decode calls failing in a row (none succeeding) that mean the context is unusable
Out = list[tuple[Any, Event]]


class Seq:
    """The scheduler's state for one request."""

    __slots__ = (
        "req",
        "sink",
        "slot",
        "prefilled",
        "n_past",
        "last",
        "generated",
        "sampler",
        "text",
        "out_tokens",
        "spec",
    )

    def __init__(self, req: GenerationRequest, sink: Any) -> None:
        self.req = req
        self.sink = sink
        self.slot = -1
        self.prefilled = 0
        self.n_past = 0
        self.last = -1
        self.generated = 0
        self.sampler: Any = None
        self.text = TextOut(req.sampling.stop)
        self.out_tokens: list[int] = []
        self.spec: Drafter | None = None  # prompt-lookup drafting, when this request may speculate


def slot_of(seq: Seq) -> int:
    return seq.slot


class BatchedSteps:
    """How a step's batch is packed, decoded and sampled; ``Scheduler`` holds the state it reads."""

    model: DecodeModel
    stats: StepStats
    tuning: Tuning
    cost: StepCost
    _clock: Callable[[], float]
    _active: list[Seq]
    _prefill_cap: int
    _last_chunk: int  # the prompt budget of the last step that ran beside streams
    _failures_in_row: int

    def _on_token(self, seq: Seq, token: int, out: Out) -> None:
        raise NotImplementedError

    def _fail(self, seq: Seq, error: RequestError, out: Out, *, broken: bool = False) -> None:
        raise NotImplementedError

    def _decode(self, gen: list[Seq], cap: int, out: Out, *, drafts: bool = True) -> None:
        """Decode ``gen``'s next tokens (plus drafts to verify) and up to ``cap`` prompt tokens; sample.

        Runs go into the batch in ascending sequence id, and a waiting prompt whose id lies between
        two streams' takes a run too (``_chunks``): llama.cpp then decodes the streams together
        in one micro-batch (plus one for the prompt chunk's rest), not one micro-batch each.
        """
        batch = Batch()
        waiting = [s for s in self._active if s.prefilled < len(s.req.prompt_tokens) and not s.req.deterministic]
        drafted = self._drafts(gen, len(waiting)) if drafts else {}
        run_len = 1 + max((len(d) for d, _ in drafted.values()), default=0) if gen else 0
        n_extra = sum(len(d) for d, _ in drafted.values())
        chunks = self._chunks(waiting, gen, n_extra, cap, run_len)
        takes = {s.slot: take for s, take in chunks}
        verify: list[tuple[Seq, int, list[int], int]] = []
        completes: list[tuple[Seq, int]] = []
        for seq in sorted([*gen, *(s for s, _ in chunks)], key=slot_of):
            take = takes.get(seq.slot, 0)
            if not take:  # a stream: its last token and its drafts in one run, logits at every one
                draft, real = drafted.get(seq.slot, ([], 0))
                at = batch.add(seq.slot, [seq.last, *draft], seq.n_past, logits=True)
                verify.append((seq, at, draft, real))
                continue
            start = seq.prefilled
            done = start + take == len(seq.req.prompt_tokens)
            batch.add(seq.slot, seq.req.prompt_tokens[start : start + take], start, logits=False, last=done)
            if done:
                completes.append((seq, len(batch) - 1))
        if not len(batch):
            return
        t0 = self._clock()
        try:
            self.model.decode(batch.tokens, batch.pos, batch.seqs, batch.want)
        except DecodeError as exc:
            self._on_decode_error(exc, gen, chunks, out, bool(drafted))
            return
        self.cost.observe(batch.ubatches(self.model.n_batch), len(batch), sum(batch.want), (self._clock() - t0) * 1000)
        self._failures_in_row = 0
        self._prefill_cap = min(self.model.n_batch, self._prefill_cap * 2)
        self._count_step(len(batch))
        for seq, take in chunks:
            seq.prefilled += take
            seq.n_past += take
        for seq, index, draft, real in verify:
            self._verify(seq, index, draft, real, out)
        m = self.model
        for seq, index in completes:
            if seq.sampler is None:
                seq.sampler = m.new_sampler(seq.req.sampling)
            self._on_token(seq, m.sample(seq.sampler, index), out)

    def _drafts(self, gen: list[Seq], waiting: int) -> dict[int, tuple[list[int], int]]:
        """Per slot: the tokens to verify and how many of them are prompt-lookup drafts (the rest pad)."""
        t = self.tuning
        specs = [s for s in gen if s.spec is not None] if t.speculate else []
        if not specs:
            return {}
        per_draft = self.cost.ms_token + self.cost.ms_logits
        n = len(gen)
        # Beside waiting prompts, their fair share of the step is theirs (prefill.fair_share_ms).
        target = t.max_step_ms - fair_share_ms(self.cost, n, waiting, t.max_step_ms)
        room = min(self.model.n_batch - n, self._prefill_cap, self.cost.budget(1, n, n, target, per_draft))
        lefts = [s.req.sampling.max_tokens - s.generated - 1 for s in specs]  # never verify past max_tokens
        rates = [s.spec.rate for s in specs if s.spec is not None]
        if waiting:
            # The step runs to the time target for the prompt anyway: drafts share it (half the room at
            # most), each as long as the drafting streams' typical draft is more likely kept than not.
            k = likely_len(rates, min(t.draft_max, room // 2 // len(specs)))
        else:
            k = draft_len(rates, lefts, len(gen), self.cost, min(t.draft_max, room // len(specs)))
        out: dict[int, tuple[list[int], int]] = {}
        for seq, left in zip(specs, lefts, strict=True):
            assert seq.spec is not None
            want = min(k, left)
            draft = seq.spec.draft(want) if want > 0 else []
            if not draft:
                seq.spec.idle()
            real = len(draft)
            if len(gen) > 1 and 0 < real < want:  # equal runs keep the step one micro-batch in llama.cpp
                draft += [draft[-1]] * (want - real)
            if draft:
                out[seq.slot] = (draft, real)
        return out

    def _chunks(
        self, waiting: list[Seq], gen: list[Seq], n_extra: int, cap: int, run_len: int
    ) -> list[tuple[Seq, int]]:
        """Prompt chunks for this step: the time target's budget, shortest remaining prompt first.

        A waiting prompt whose sequence id lies between two streams' first takes ``run_len`` tokens
        (the streams' longest run) where the budget allows, else one: llama.cpp batches only
        consecutive sequence ids together, so without it each stream would be a micro-batch of
        its own, reading all the weights again (``Batch.ubatches``).
        """
        if not waiting or cap <= 0:
            return []
        n_gen = len(gen)
        room = min(cap, self.model.n_batch - n_gen - n_extra)
        budget = prompt_budget(self.cost, n_gen, n_extra, self.tuning.max_step_ms, room, len(waiting))
        if n_gen:  # beside streams a chunk at most doubles, so one bad estimate cannot stall them for seconds
            budget = min(budget, max(2 * MIN_CHUNK, 2 * self._last_chunk))
            self._last_chunk = budget
        lo, hi = (min(s.slot for s in gen), max(s.slot for s in gen)) if gen else (0, 0)
        between = [lo < s.slot < hi for s in waiting]
        floor = run_len if run_len * sum(between) <= budget else 1
        floors = [floor if b else 0 for b in between]
        takes = plan_prefill([len(s.req.prompt_tokens) - s.prefilled for s in waiting], budget, room, floors)
        return [(s, take) for s, take in zip(waiting, takes, strict=True) if take]

    def _verify(self, seq: Seq, index: int, draft: list[int], real: int, out: Out) -> None:
        """Sample at the last token and each draft in turn while the sample equals the draft; emit them.

        ``real``: how many of ``draft`` came from the prompt lookup (the rest is padding).
        """
        m = self.model
        emitted: list[int] = []
        for j in range(len(draft) + 1):
            token = m.sample(seq.sampler, index + j)
            emitted.append(token)
            if j == len(draft) or token != draft[j] or m.is_eog(token):
                break
        accepted = len(emitted) - 1
        seq.n_past += 1 + accepted
        if accepted < len(draft):  # the rejected drafts' cells must not stay in its KV stream
            m.clear_seq(seq.slot, seq.n_past)
        if real:
            st = self.stats
            st.draft_tokens += real
            st.draft_accepted += min(accepted, real)
            st.draft_verifications += 1
            if seq.spec is not None:
                seq.spec.verified(min(accepted, real), real)
        for token in emitted:
            self._on_token(seq, token, out)
            if seq.sampler is None:  # it finished (stop string, end of generation): the rest is dropped
                return

    def _count_step(self, n_tokens: int) -> None:
        st = self.stats
        st.steps += 1
        st.last_batch_tokens = n_tokens
        st.batch_tokens_total += n_tokens
        st.batch_hist[bisect.bisect_left(BATCH_BUCKETS, n_tokens)] += 1

    def _on_decode_error(
        self, exc: DecodeError, gen: list[Seq], chunks: list[tuple[Seq, int]], out: Out, drafted: bool
    ) -> None:
        # Forget any cells the failed call left behind, so a retry starts from known positions.
        for seq in gen:
            self.model.clear_seq(seq.slot, seq.n_past)
        for seq, _ in chunks:
            self.model.clear_seq(seq.slot, seq.prefilled)
        st = self.stats
        prompt_tokens = sum(take for _, take in chunks)
        if exc.rc == NO_KV_SLOT and drafted:  # the same step without drafts first; fewer drafts after
            st.decode_retries += 1
            self._prefill_cap = max(1, (exc.n_tokens - len(gen)) // 2)
            self._decode(gen, prompt_tokens, out, drafts=False)
        elif exc.rc == NO_KV_SLOT and prompt_tokens > 1:
            st.decode_retries += 1
            self._prefill_cap = max(1, prompt_tokens // 2)
            self._decode(gen, self._prefill_cap, out, drafts=False)
        elif exc.rc == NO_KV_SLOT and len(gen) + len(chunks) > 1:
            # Two smaller groups; the one-token prompt chunk goes with the second.
            st.decode_retries += 1
            half = (len(gen) + 1) // 2
            self._decode(gen[:half], 0, out, drafts=False)
            self._decode(gen[half:], prompt_tokens, out, drafts=False)
        else:
            if exc.rc != NO_KV_SLOT:
                self._failures_in_row += 1
                if self._failures_in_row >= FATAL_AFTER:
                    raise exc
            error = GenerationFailed(f"The model could not decode this request: {exc.message}")
            for seq in gen + [s for s, _ in chunks]:
                self._fail(seq, error, out, broken=True)
