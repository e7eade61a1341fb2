"""How much memory a served GGUF needs: the KV cache shape read from its metadata, and the sums.

llama.cpp keeps, per layer and per cell, one key vector of ``n_embd_k_gqa`` and one value
vector of ``n_embd_v_gqa`` elements, f16 by default (2 bytes each). So the cache is
``cells × n_layer × (n_embd_k_gqa + n_embd_v_gqa) × 2`` bytes, with ``cells = ctx × parallel``.
Models with sliding-window layers (Gemma 3) need less; this is the upper bound, which is
what a memory limit wants.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlserve.bundles import gguf_info
from mlserve.errors import GGUFError

F16_BYTES = 2
# Python, uvicorn, llama.cpp's compute buffers and logits: measured 70 to 150 MB RSS beyond
# model + KV cache with Gemma 3 270M (262,144-token vocabulary) at batch 512; rounded up.
RUNTIME_BYTES = 256 << 20


@dataclass(frozen=True)
class KVShape:
    """The GGUF facts that size llama.cpp's KV cache."""

    n_layer: int
    n_embd_k_gqa: int  # key elements per cell per layer: key_length × head_count_kv
    n_embd_v_gqa: int

    @property
    def bytes_per_cell(self) -> int:
        """f16 bytes one cell takes across all layers."""
        return self.n_layer * (self.n_embd_k_gqa + self.n_embd_v_gqa) * F16_BYTES


def kv_bytes(shape: KVShape, cells: int) -> int:
    """Bytes of a KV cache of ``cells`` cells."""
    return cells * shape.bytes_per_cell


def _int(meta: dict[str, Any], key: str) -> int | None:
    value = meta.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def kv_shape(path: Path) -> KVShape | None:
    """The KV cache shape of the GGUF at ``path``, or None when its metadata does not say."""
    try:
        meta = gguf_info.metadata(path)
    except GGUFError:
        return None
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return None
    n_layer = _int(meta, f"{arch}.block_count")
    n_embd = _int(meta, f"{arch}.embedding_length")
    n_head = _int(meta, f"{arch}.attention.head_count")
    # head_count_kv may be a per-layer array (left out above): then assume no GQA, an upper bound.
    n_head_kv = _int(meta, f"{arch}.attention.head_count_kv") or n_head
    if not (n_layer and n_head_kv):
        return None
    head_dim = n_embd // n_head if n_embd and n_head else None
    key_len = _int(meta, f"{arch}.attention.key_length") or head_dim
    value_len = _int(meta, f"{arch}.attention.value_length") or head_dim
    if not (key_len and value_len):
        return None
    return KVShape(n_layer=n_layer, n_embd_k_gqa=key_len * n_head_kv, n_embd_v_gqa=value_len * n_head_kv)
