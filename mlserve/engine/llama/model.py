"""llama.cpp's generation side: model, context, batches, native samplers (backends.py does process-wide init).

Everything here runs on the engine thread that owns the context, except tokenising,
which reads only the (immutable) vocabulary. Every file is validated as GGUF by our own
parser before llama.cpp opens it.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as ll
import numpy as np

from mlserve.bundles.gguf_info import inspect
from mlserve.engine.api import InvalidRequest, Sampling
from mlserve.engine.decode import DecodeError
from mlserve.engine.llama.backends import backend_init
from mlserve.engine.llama.grammar import GrammarChain, VocabIndex, build_index, compile_grammar, free_sampler
from mlserve.errors import EngineError, GGUFError

PENALTY_LAST_N = 64  # tokens the repeat/frequency/presence penalties look back over
RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's "pick a random seed"
PIECE_BUF = 256  # most pieces fit; longer ones are retried at the size llama.cpp asks for
META_BUF = 1 << 16
_LIST_CHUNK = 1 << 16
# Tokens that llama.cpp turns into ids only when asked to parse special tokens.
_GATED = ll.LLAMA_TOKEN_ATTR_CONTROL | ll.LLAMA_TOKEN_ATTR_UNKNOWN


def _ptr(tokens: Any) -> Any:
    return tokens.ctypes.data_as(ctypes.POINTER(ll.llama_token))


@dataclass(frozen=True)
class LoadParams:
    """GPU and KV-cache settings given to llama.cpp at load time, as its enum values (see engine/llama/gpu.py)."""

    split_mode: int = 1  # LLAMA_SPLIT_MODE_LAYER, llama.cpp's default
    main_gpu: int = 0
    tensor_split: tuple[float, ...] = ()  # empty: llama.cpp splits by free memory
    flash_attn: int = -1  # LLAMA_FLASH_ATTN_TYPE_AUTO
    type_k: int = 1  # GGML_TYPE_F16
    type_v: int = 1


class Argmax:
    """Greedy sampling without penalties: the first highest logit, read in place.

    The same token llama.cpp's greedy sampler picks (it keeps the first maximum too), without
    copying all 262,144 logits of Gemma 3 into a candidate array first: 0.09 instead of 0.41 ms
    per sampled position, which speculation multiplies by the positions it verifies.
    """

    __slots__ = ()


class LlamaModel:
    """One loaded model with one context of ``n_seq`` sequences of ``n_ctx_seq`` cells each."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx_seq: int,
        n_seq: int,
        n_threads: int,
        n_gpu_layers: int = 0,
        n_batch: int = 512,
        kv_unified: bool = False,
        swa_full: bool = False,
        load: LoadParams | None = None,
    ) -> None:
        try:
            inspect(Path(path))
        except GGUFError as exc:
            raise EngineError(exc.message, "Run `mlserve verify`, or pack the GGUF again.") from exc
        backend_init()
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        load = load or LoadParams()
        mparams.split_mode = load.split_mode
        mparams.main_gpu = load.main_gpu
        split = (ctypes.c_float * len(load.tensor_split))(*load.tensor_split) if load.tensor_split else None
        mparams.tensor_split = split  # llama.cpp reads it during the load only; `split` outlives the call
        self.model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise EngineError(f"llama.cpp could not load {path}.", "Run `mlserve verify` and `mlserve doctor`.")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = int(ll.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(ll.llama_model_n_ctx_train(self.model))
        self.n_swa = int(ll.llama_model_n_swa(self.model))
        self.n_ctx_seq = n_ctx_seq
        self.n_seq = n_seq
        self.n_batch = n_batch
        self.kv_unified = kv_unified
        cparams = ll.llama_context_default_params()
        # Either way every sequence may fill its own n_ctx_seq cells: the cache never overflows.
        cparams.n_ctx = n_ctx_seq * n_seq
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        cparams.kv_unified = kv_unified
        cparams.swa_full = swa_full
        cparams.flash_attn_type = load.flash_attn
        cparams.type_k = load.type_k
        cparams.type_v = load.type_v
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise EngineError(f"llama.cpp could not create a context of {cparams.n_ctx} cells for {path}.")
        self.mem = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(n_batch, 0, 1)
        self._tok = np.ctypeslib.as_array(self.batch.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_batch,))
        self._nseq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n_batch,))
        self._logits = np.ctypeslib.as_array(self.batch.logits, shape=(n_batch,))
        self._seq = [self.batch.seq_id[i] for i in range(n_batch)]
        self._nseq[:] = 1
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(PIECE_BUF)
        self._index: VocabIndex | None = None  # grammar_index(), built on first use
        self._index_lock = threading.Lock()

    # -- vocabulary (read-only; safe from any thread) ---------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Tokenise text; control-token text becomes control tokens only with ``parse_special``."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest("The prompt is not valid Unicode (it holds a lone surrogate).") from None
        buf = np.empty(len(data) + 16, dtype=np.int32)  # uninitialised: zeroing 16 MB holds the GIL
        n = ll.llama_tokenize(self.vocab, data, len(data), _ptr(buf), len(buf), add_special, parse_special)
        if n < 0:
            buf = np.empty(-n, dtype=np.int32)
            n = ll.llama_tokenize(self.vocab, data, len(data), _ptr(buf), len(buf), add_special, parse_special)
        if n <= _LIST_CHUNK:
            return buf[:n].tolist()  # type: ignore[no-any-return]
        # Chunks, so a worker thread turning a million tokens into a list lets the event loop run.
        tokens: list[int] = []
        for at in range(0, n, _LIST_CHUNK):
            tokens.extend(buf[at : min(n, at + _LIST_CHUNK)].tolist())
        return tokens

    def tokenize_parts(self, parts: list[tuple[str, bool]]) -> list[int]:
        """Tokenise a rendered chat prompt: control tokens only from the template's markup.

        ``parts`` are (text, is_content) in order. The result equals tokenising the joined
        text with special-token parsing (llama.cpp splits the text at control-token matches
        and tokenises the runs between them on their own) except that matches inside
        content stay plain text, so a message cannot forge a turn boundary.
        """
        tokens: list[int] = []
        run: list[str] = []  # plain text since the last control token

        def flush() -> None:
            text = "".join(run)
            run.clear()
            if text:
                tokens.extend(self.tokenize(text, add_special=False, parse_special=False))

        for text, is_content in parts:
            if is_content:
                run.append(text)
                continue
            cursor = 0
            for token in self.tokenize(text, add_special=False, parse_special=True):
                if not ll.llama_vocab_get_attr(self.vocab, token) & _GATED:
                    continue
                mark = self.token_text(token)
                at = text.find(mark, cursor) if mark else -1
                if at < 0:  # an <unk> for an unknown byte, not a literal marker
                    continue
                run.append(text[cursor:at])
                flush()
                tokens.append(token)
                cursor = at + len(mark)
            run.append(text[cursor:])
        flush()
        return tokens

    def piece(self, token: int) -> bytes:
        """The bytes a token renders to (special tokens render empty)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = self._piece_buf
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:  # -n bytes are needed
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            cached = buf.raw[: max(n, 0)]
            self._pieces[token] = cached
        return cached

    def is_eog(self, token: int) -> bool:
        """Whether a token ends generation (EOS, EOT, ...)."""
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        """A token's text as stored in the vocabulary (e.g. '<bos>')."""
        if token < 0:
            return ""
        return bytes(ll.llama_vocab_get_text(self.vocab, token)).decode("utf-8", errors="replace")

    def special_tokens(self) -> dict[str, str]:
        """bos and eos token text, for chat templates."""
        return {
            "bos_token": self.token_text(ll.llama_vocab_bos(self.vocab)),
            "eos_token": self.token_text(ll.llama_vocab_eos(self.vocab)),
        }

    def add_bos(self) -> bool:
        """Whether the tokenizer adds BOS itself."""
        return bool(ll.llama_vocab_get_add_bos(self.vocab))

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string."""
        buf = ctypes.create_string_buffer(META_BUF)
        n = ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        if n >= len(buf):  # snprintf semantics: n is the whole value's length
            buf = ctypes.create_string_buffer(n + 1)
            n = ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return None if n < 0 else buf.raw[:n].decode("utf-8", errors="replace")

    # -- the engine thread's operations ------------------------------------------
    def decode(self, tokens: list[int], pos: list[int], seqs: list[int], want: list[bool]) -> None:
        """Run one llama_decode over a packed batch; raise DecodeError(rc) when it returns non-zero."""
        n = len(tokens)
        self._tok[:n] = tokens
        self._pos[:n] = pos
        self._logits[:n] = want
        seq_ptrs = self._seq
        for i, s in enumerate(seqs):
            seq_ptrs[i][0] = s
        self.batch.n_tokens = n
        rc = ll.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise DecodeError(int(rc), n)

    def logits(self, index: int) -> Any:
        """A copy of the logits at a batch index (for tests and diagnostics)."""
        ptr = ll.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def new_sampler(self, cfg: Sampling) -> Any:
        """A native sampler chain for these parameters; greedy when temperature is 0; grammar first when given."""
        penalized = cfg.repeat_penalty != 1.0 or bool(cfg.frequency_penalty) or bool(cfg.presence_penalty)
        if cfg.grammar is not None:
            keep = 1 if cfg.temperature <= 0 else cfg.top_k if cfg.top_k > 0 else self.n_vocab
            penalties = self._penalties(cfg) if penalized else None
            eog = int(ll.llama_vocab_eos(self.vocab))
            index = self.grammar_index()
            chain = self._chain(cfg)
            return GrammarChain(self.vocab, cfg.grammar, penalties, chain, keep, cfg.min_p, eog, self.piece, index)
        if cfg.temperature <= 0 and not penalized:
            return Argmax()
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if penalized:
            ll.llama_sampler_chain_add(chain, self._penalties(cfg))
        return self._chain(cfg, chain)

    def _penalties(self, cfg: Sampling) -> Any:
        return ll.llama_sampler_init_penalties(
            self.n_vocab, PENALTY_LAST_N, cfg.repeat_penalty, cfg.frequency_penalty, cfg.presence_penalty
        )

    def _chain(self, cfg: Sampling, chain: Any = None) -> Any:
        """The samplers after penalties (and after a grammar): top-k, top-p, min-p, temperature, draw."""
        if chain is None:
            chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if cfg.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        if cfg.top_k > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(cfg.top_k))
        if cfg.top_p < 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(cfg.top_p, 1))
        if cfg.min_p > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(cfg.min_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(cfg.temperature))
        ll.llama_sampler_chain_add(
            chain, ll.llama_sampler_init_dist(RANDOM_SEED if cfg.seed is None else cfg.seed & 0xFFFFFFFF)
        )
        return chain

    def sample(self, sampler: Any, index: int) -> int:
        """Sample (and accept) the next token from the logits at a batch index."""
        if isinstance(sampler, Argmax):
            row = ll.llama_get_logits_ith(self.ctx, index)
            return int(np.argmax(np.ctypeslib.as_array(row, shape=(self.n_vocab,))))
        if isinstance(sampler, GrammarChain):
            return sampler.sample(self.ctx, index)
        return int(ll.llama_sampler_sample(sampler, self.ctx, index))

    def free_sampler(self, sampler: Any) -> None:
        """Release a sampler chain."""
        if isinstance(sampler, GrammarChain):
            sampler.free()
        elif not isinstance(sampler, Argmax):
            ll.llama_sampler_free(sampler)

    def check_grammar(self, text: str) -> None:
        """InvalidRequest unless llama.cpp compiles ``text`` against this vocabulary (any thread)."""
        free_sampler(compile_grammar(self.vocab, text))
        self.grammar_index()  # built here, in a worker thread, not on the engine thread at the first sample

    def grammar_index(self) -> VocabIndex:
        """The vocabulary's index for grammar sampling (built once: about a second for 262k tokens)."""
        with self._index_lock:
            if self._index is None:
                buf = ctypes.create_string_buffer(PIECE_BUF)  # its own: piece()'s belongs to the engine thread
                pieces = []
                for token in range(self.n_vocab):
                    n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
                    if n < 0:  # longer than the buffer
                        big = ctypes.create_string_buffer(-n)
                        n = ll.llama_token_to_piece(self.vocab, token, big, len(big), 0, False)
                        pieces.append(big.raw[: max(n, 0)])
                    else:
                        pieces.append(buf.raw[:n])
                self._index = build_index(pieces)
            return self._index

    def clear_seq(self, seq: int, p0: int = -1) -> bool:
        """Drop a sequence's KV cells from position ``p0`` on (all when -1)."""
        return bool(ll.llama_memory_seq_rm(self.mem, seq, p0, -1))

    def seq_pos_min(self, seq: int) -> int:
        """Smallest position still cached for a sequence (-1 when empty)."""
        return int(ll.llama_memory_seq_pos_min(self.mem, seq))

    def close(self) -> None:
        """Free the batch, context and model."""
        if getattr(self, "ctx", None):
            ll.llama_batch_free(self.batch)
            ll.llama_free(self.ctx)
            ll.llama_model_free(self.model)
            self.ctx = None
