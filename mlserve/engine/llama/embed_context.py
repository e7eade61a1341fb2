"""The embeddings context: a second llama.cpp context on the loaded model, mean pooling per sequence.

It imports ``llama_cpp`` beside ``model.py`` (tests/test_layers.py lists both): a context made
with ``embeddings = true`` and mean pooling cannot also serve generation, so it is its own object,
sharing only the model's weights (no second copy in memory), used by one thread only.

Each input is its own sequence; several are packed into one ``llama_decode``, whose pooled
output per sequence (``llama_get_embeddings_seq``) is the mean of its tokens' final hidden
states. Pooling needs a sequence's tokens in one micro-batch, so ``n_ctx`` bounds both one
input and one call. llama.cpp still computes the output head for every token it pools (about
1 MiB of compute buffer per token of ``n_ctx`` with Gemma's 262,144-token vocabulary), which is
why this context is sized by ``serve --embeddings-ctx``, not by the generation context.
"""

from __future__ import annotations

from typing import Any

import llama_cpp as ll
import numpy as np

from mlserve.engine.decode import DecodeError
from mlserve.engine.llama.model import LlamaModel
from mlserve.errors import EngineError


class EmbeddingContext:
    """One mean-pooling context of ``n_ctx`` cells for up to ``n_seq`` inputs per decode."""

    def __init__(self, model: LlamaModel, *, n_ctx: int, n_seq: int, n_threads: int) -> None:
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.embeddings = True
        cparams.pooling_type = ll.LLAMA_POOLING_TYPE_MEAN
        cparams.kv_unified = True  # one pool of cells: any input may use all of them
        cparams.no_perf = True
        self.ctx = ll.llama_init_from_model(model.model, cparams)
        if not self.ctx:
            raise EngineError(
                f"llama.cpp could not create an embeddings context of {n_ctx} tokens.",
                "Lower --embeddings-ctx, or serve without --embeddings.",
            )
        if ll.llama_pooling_type(self.ctx) != ll.LLAMA_POOLING_TYPE_MEAN:
            ll.llama_free(self.ctx)
            raise EngineError("llama.cpp did not accept mean pooling for this model's embeddings context.")
        self.n_batch = n_ctx
        self.n_seq = n_seq
        self.n_embd = int(ll.llama_model_n_embd(model.model))
        self.mem = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(n_ctx, 0, 1)
        self._tok = np.ctypeslib.as_array(self.batch.token, shape=(n_ctx,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_ctx,))
        self._nseq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n_ctx,))
        self._out = np.ctypeslib.as_array(self.batch.logits, shape=(n_ctx,))
        self._seq = [self.batch.seq_id[i] for i in range(n_ctx)]
        self._nseq[:] = 1
        self._out[:] = 1  # pooling reads every token's hidden state

    def embed(self, inputs: list[list[int]]) -> list[Any]:
        """One llama_decode over ``inputs`` (each its own sequence); their mean-pooled vectors, not normalised."""
        at = 0
        for seq, tokens in enumerate(inputs):
            n = len(tokens)
            self._tok[at : at + n] = tokens
            self._pos[at : at + n] = np.arange(n)
            for i in range(at, at + n):
                self._seq[i][0] = seq
            at += n
        self.batch.n_tokens = at
        ll.llama_memory_clear(self.mem, True)  # nothing carries over between calls
        rc = ll.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise DecodeError(int(rc), at)
        vectors = []
        for seq in range(len(inputs)):
            ptr = ll.llama_get_embeddings_seq(self.ctx, seq)
            if not ptr:
                raise DecodeError(-1, at)
            vectors.append(np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float64))
        return vectors

    def close(self) -> None:
        """Free the batch and the context (the model stays)."""
        if getattr(self, "ctx", None):
            ll.llama_batch_free(self.batch)
            ll.llama_free(self.ctx)
            self.ctx = None
