"""Speculation on the real Gemma 3 270M: the model's own greedy choices, agreeing logits, no leaks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mlserve.engine.api import ErrorEvent, GenerationRequest, Sampling
from mlserve.engine.llama.engine import EngineConfig, LlamaEngine
from mlserve.engine.llama.model import LlamaModel

pytestmark = pytest.mark.model
DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "dialogue-to-note.jsonl"
SYSTEM = "Summarise the conversation as a short clinical note. Use the patient's own words."


def _dialogue(i: int, chars: int = 1500) -> str:
    return str(json.loads(DATA.read_text().splitlines()[i])["dialogue"][:chars])


NEAR_TIE = 0.25  # logits: batch-size rounding can flip an argmax only between candidates this close


def _speculative_tokens(gemma_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int], int]:
    """The prompt, the 64 tokens a speculating engine emits for it alone, and the drafts it accepted."""
    emitted: list[int] = []
    sample = LlamaModel.sample

    def recording(self: LlamaModel, sampler: object, index: int) -> int:
        token = sample(self, sampler, index)
        emitted.append(token)  # every sample call is an emitted token (verification stops at a mismatch)
        return token

    monkeypatch.setattr(LlamaModel, "sample", recording)

    async def run() -> tuple[list[int], list[int], int]:
        config = EngineConfig(gemma_path, "gemma3-270m:1", ctx_size=1024, parallel=2, threads=2)
        engine = LlamaEngine(config)
        await engine.start()
        try:
            prompt = await engine.tokenize(f"{SYSTEM}\n\n{_dialogue(0)}\n\nClinical note:\n")
            emitted.clear()  # the warm-up's token
            async for ev in engine.generate(GenerationRequest("g", prompt, Sampling(max_tokens=64, temperature=0))):
                assert not isinstance(ev, ErrorEvent), ev
            stats = engine.stats()
            assert stats is not None
            return prompt, list(emitted), stats.draft_accepted
        finally:
            await engine.close()

    return asyncio.run(run())


def test_greedy_output_is_the_models_choice_at_every_token(gemma_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every token speculation emits is what one-token decoding of the same prefix picks, or a near tie.

    Measured: byte-identical output is not guaranteed, because a multi-token verification call
    rounds differently from a one-token call (as any batch does); see the README.
    """
    # Verify every draft the lookup finds: exactness must not depend on the policy that sizes them.
    monkeypatch.setattr("mlserve.engine.batching.draft_len", lambda rates, lefts, n, cost, k_max: k_max)
    prompt, tokens, accepted = _speculative_tokens(gemma_path, monkeypatch)
    assert len(tokens) == 64 and accepted > 10  # drafts were verified and accepted
    m = LlamaModel(gemma_path, n_ctx_seq=1024, n_seq=1, n_threads=2)
    try:
        _prefill(m, 0, prompt)
        n, gaps, at = len(prompt), [], len(prompt) - 1  # the prefill's logits are at its last index
        for i, token in enumerate(tokens):
            logits = m.logits(at)
            gaps.append(float(logits.max() - logits[token]))
            m.decode([token], [n + i], [0], [True])
            at = 0
    finally:
        m.close()
    assert max(gaps) <= NEAR_TIE, gaps  # 0 where it is the argmax
    assert sum(g > 0 for g in gaps) <= 2, gaps


@pytest.fixture(scope="module")
def model(gemma_path: Path) -> Iterator[LlamaModel]:
    m = LlamaModel(gemma_path, n_ctx_seq=1024, n_seq=2, n_threads=2)
    yield m
    m.close()


def _prefill(m: LlamaModel, seq: int, tokens: list[int]) -> None:
    m.clear_seq(seq)
    n = len(tokens)
    m.decode(tokens, list(range(n)), [seq] * n, [False] * (n - 1) + [True])


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_verification_logits_agree_with_one_token_steps(model: LlamaModel) -> None:
    """Teacher-forced: logits at k positions of one verification call vs k one-token calls."""
    prompt = model.tokenize(_dialogue(1, 800))
    forced = model.tokenize(_dialogue(2, 200), add_special=False)[:9]
    n = len(prompt)
    _prefill(model, 0, prompt)
    model.decode(forced, list(range(n, n + 9)), [0] * 9, [True] * 9)
    batched = [model.logits(i) for i in range(9)]
    _prefill(model, 0, prompt)
    single = []
    for j, t in enumerate(forced):
        model.decode([t], [n + j], [0], [True])
        single.append(model.logits(0))
    top = np.mean([a.argmax() == b.argmax() for a, b in zip(batched, single, strict=True)])
    worst = min(_cos(a, b) for a, b in zip(batched, single, strict=True))
    assert top >= 0.9 and worst >= 0.98, (top, worst)
    model.clear_seq(0)


def test_rejected_draft_leaves_no_trace(model: LlamaModel) -> None:
    """Sequence 0 verifies junk drafts beside sequence 1 and rolls them back: neither one's next logits change."""
    a = model.tokenize(_dialogue(3, 600))
    b = model.tokenize(_dialogue(4, 600))
    na, nb = len(a), len(b)

    def step(junk: bool) -> tuple[np.ndarray, np.ndarray]:
        _prefill(model, 0, a[:-1])
        _prefill(model, 1, b[:-1])
        drafts = [7, 8, 9, 10] if junk else []
        k = len(drafts)
        model.decode([a[-1], *drafts, b[-1]], [*range(na - 1, na + k), nb - 1], [0] * (k + 1) + [1], [True] * (k + 2))
        b_first = model.logits(k + 1)
        model.clear_seq(0, na)  # the drafts' cells leave sequence 0
        nxt_a = int(model.logits(0).argmax())
        nxt_b = int(b_first.argmax())
        model.decode([nxt_a, nxt_b], [na, nb], [0, 1], [True, True])
        return model.logits(0), model.logits(1)

    clean_a, clean_b = step(junk=False)
    after_a, after_b = step(junk=True)
    assert clean_a.argmax() == after_a.argmax() and _cos(clean_a, after_a) >= 0.999
    assert clean_b.argmax() == after_b.argmax() and _cos(clean_b, after_b) >= 0.999
    model.clear_seq(0)
    model.clear_seq(1)


def test_argmax_picks_what_llama_cpps_greedy_sampler_picks(gemma_path: Path) -> None:
    """The in-place greedy pick (no candidate array) equals llama.cpp's greedy sampler at every position.

    Also where the logits tie at the top (set so by hand): both keep the first maximum.
    """
    import llama_cpp as ll

    from mlserve.engine.llama.model import Argmax

    model = LlamaModel(gemma_path, n_ctx_seq=512, n_seq=1, n_threads=2)
    try:
        tokens = model.tokenize(f"{SYSTEM}\n\n{_dialogue(1, 600)}")
        model.decode(tokens, list(range(len(tokens))), [0] * len(tokens), [True] * len(tokens))
        fast = model.new_sampler(Sampling(max_tokens=8, temperature=0))
        assert isinstance(fast, Argmax)
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        picks = [model.sample(fast, i) for i in range(len(tokens))]
        assert picks == [int(ll.llama_sampler_sample(chain, model.ctx, i)) for i in range(len(tokens))]
        assert len(set(picks)) > 5  # real, varied choices, not one token everywhere
        row = np.ctypeslib.as_array(ll.llama_get_logits_ith(model.ctx, 0), shape=(model.n_vocab,))
        top = float(row.max())
        row[[7, 99, 4000]] = top + 1.0  # a three-way tie above everything else
        assert model.sample(fast, 0) == int(ll.llama_sampler_sample(chain, model.ctx, 0)) == 7
        penalized = model.new_sampler(Sampling(max_tokens=8, temperature=0, repeat_penalty=1.1))
        assert not isinstance(penalized, Argmax)  # penalties keep llama.cpp's chain (it has state)
        model.free_sampler(penalized)
        model.free_sampler(fast)
        ll.llama_sampler_free(chain)
    finally:
        model.close()
