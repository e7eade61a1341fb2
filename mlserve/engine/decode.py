"""The narrow model interface the scheduler drives: batched decode, native samplers, KV cells.

``mlserve.engine.llama.model.LlamaModel`` implements it over llama.cpp; the scheduler's unit
tests drive a deterministic fake (``tests/support/fake_decode.py``) through the same calls.
"""

from __future__ import annotations

from typing import Any, Protocol

from mlserve.errors import EngineError

NO_KV_SLOT = 1  # llama_decode's "could not find a KV slot for the batch": a smaller batch may fit


class DecodeError(EngineError):
    """llama_decode returned a non-zero code; the context itself is still usable."""

    def __init__(self, rc: int, n_tokens: int) -> None:
        super().__init__(f"llama_decode failed with code {rc} for a batch of {n_tokens} tokens.")
        self.rc = rc
        self.n_tokens = n_tokens


class DecodeModel(Protocol):
    """One context of ``n_seq`` KV sequences, decoded by a single thread."""

    n_seq: int  # sequence ids (slots) 0 .. n_seq-1
    n_batch: int  # most tokens one decode call takes
    n_swa: int  # sliding-window size (0: full attention)

    def decode(self, tokens: list[int], pos: list[int], seqs: list[int], want: list[bool]) -> None:
        """Decode one packed batch; raise DecodeError(rc) when llama_decode refuses or fails it."""
        ...

    def new_sampler(self, cfg: Any) -> Any:
        """A sampler chain for one sequence's sampling parameters."""
        ...

    def sample(self, sampler: Any, index: int) -> int:
        """Sample (and accept) a token from the logits at a batch index of the last decode."""
        ...

    def free_sampler(self, sampler: Any) -> None:
        """Release a sampler chain."""
        ...

    def clear_seq(self, seq: int, p0: int = -1) -> bool:
        """Drop a sequence's cells from position ``p0`` on (all when -1)."""
        ...

    def seq_pos_min(self, seq: int) -> int:
        """Smallest position still cached for a sequence (-1 when empty)."""
        ...

    def is_eog(self, token: int) -> bool:
        """Whether a token ends generation."""
        ...

    def piece(self, token: int) -> bytes:
        """The bytes a token renders to."""
        ...
