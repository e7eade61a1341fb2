"""Write tiny, valid llama-architecture GGUF files for fast tests (~0.5 MB, loads in llama.cpp)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

N_EMBD = 64
N_FF = 128
N_HEAD = 4
N_HEAD_KV = 2
N_LAYER = 2
N_CTX = 256


def _base26(n: int, letters: str) -> str:
    out = ""
    while True:
        n, r = divmod(n, 26)
        out += letters[r]
        if n == 0:
            return out


def _vocab(size: int) -> tuple[list[bytes], list[float], list[int]]:
    """An SPM-style vocabulary: control tokens, 256 byte tokens, then a few word pieces."""
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>".encode())
        types.append(TokenType.BYTE)
    words = ["\u2581", "\u2581the", "\u2581a", "\u2581and", "\u2581of", "\u2581to", "\u2581is", "\u2581in", "e", "t"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    seen = set(tokens)
    i = 0
    while len(tokens) < size:
        piece = (words[i] if i < len(words) else "\u2581" + _base26(i, letters)).encode()
        i += 1
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(TokenType.NORMAL)
    scores = [0.0] * 259 + [-float(k) for k in range(len(tokens) - 259)]
    return tokens[:size], scores[:size], [int(t) for t in types[:size]]


def write_tiny_llama(
    path: Path,
    seed: int = 0,
    vocab: int = 300,
    extra_tokens: tuple[bytes, ...] = (),
    chat_template: str | None = None,
) -> Path:
    """Write a 2-layer llama GGUF with random f32 weights; different seeds give different bytes.

    ``extra_tokens`` become the vocabulary's last normal tokens (the total stays ``vocab``);
    ``chat_template`` is stored as ``tokenizer.chat_template``.
    """
    if vocab - len(extra_tokens) < 270:
        raise ValueError("vocab must hold the 3 control and 256 byte tokens plus some words")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab(vocab - len(extra_tokens))
    tokens += list(extra_tokens)
    scores += [-1000.0] * len(extra_tokens)
    types += [int(TokenType.NORMAL)] * len(extra_tokens)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"tiny-llama-{seed}")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_file_type(0)  # ALL_F32
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    head_dim = N_EMBD // N_HEAD
    kv_dim = head_dim * N_HEAD_KV
    # numpy shapes are (rows, cols) = (out, in); GGUF stores them reversed, as llama.cpp expects.
    writer.add_tensor("token_embd.weight", weight(vocab, N_EMBD))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", weight(vocab, N_EMBD))
    for i in range(N_LAYER):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "attn_q.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(p + "attn_k.weight", weight(kv_dim, N_EMBD))
        writer.add_tensor(p + "attn_v.weight", weight(kv_dim, N_EMBD))
        writer.add_tensor(p + "attn_output.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(p + "ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(p + "ffn_down.weight", weight(N_EMBD, N_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_header(path: Path, version: int = 3, n_tensors: int = 0, n_kv: int = 0, tail: bytes = b"") -> Path:
    """Write a bare GGUF header (magic, version, counts) plus ``tail``: for malformed-file tests."""
    path = Path(path)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + tail)
    return path
