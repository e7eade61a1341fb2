"""GGUF validation: the tiny test model, the real Gemma file and malformed files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from mlserve.bundles import gguf_info
from mlserve.errors import GGUFError
from tests.support.ggufgen import write_header, write_tiny_llama
from tests.support.storeutil import assert_one_error, manifests


def test_tiny_gguf_passes_inspection(tiny_gguf: Path) -> None:
    facts = gguf_info.inspect(tiny_gguf)
    assert facts.architecture == "llama"
    assert facts.gguf_version == 3
    assert facts.tensor_count == 3 + 2 * 9
    assert facts.vocab_size == 300
    assert facts.context_length == 256
    assert facts.file_type == "ALL_F32"
    assert 100_000 < facts.parameter_count < 200_000
    assert 200_000 < tiny_gguf.stat().st_size < 1_000_000


def test_tiny_gguf_loads_and_generates_in_llama_cpp(tiny_gguf: Path) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=str(tiny_gguf), n_ctx=64, verbose=False, seed=1)
    try:
        assert llm.n_vocab() == 300
        out = llm("the a", max_tokens=8, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1
        assert out["usage"]["prompt_tokens"] >= 2
    finally:
        llm.close()


def test_seeds_give_different_bytes_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=1).read_bytes()
    b = write_tiny_llama(tmp_path / "b.gguf", seed=1).read_bytes()
    c = write_tiny_llama(tmp_path / "c.gguf", seed=2).read_bytes()
    assert a == b
    assert a != c and len(a) == len(c)


def test_gemma_facts(gemma_path: Path) -> None:
    facts = gguf_info.inspect(gemma_path)
    assert facts.architecture == "gemma3"
    assert facts.vocab_size == 262144
    assert facts.file_type is not None and "Q4_K" in facts.file_type
    assert 200_000_000 < facts.parameter_count < 300_000_000


def _truncated(tiny_gguf: Path, tmp_path: Path) -> Path:
    path = tmp_path / "truncated.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    return path


def _cut_in_header(tiny_gguf: Path, tmp_path: Path) -> Path:
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[:200])
    return path


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "notes.gguf"
    path.write_text("These are not the weights you are looking for.\n" * 20)
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    return path


def _absurd_tensors(tmp_path: Path) -> Path:
    return write_header(tmp_path / "absurd.gguf", n_tensors=2**62, n_kv=1, tail=b"\0" * 64)


def _version(tmp_path: Path, version: int) -> Path:
    return write_header(tmp_path / f"v{version}.gguf", version=version, n_tensors=1, tail=b"\0" * 64)


def _huge_string(tmp_path: Path) -> Path:
    # One key whose length field claims 2**60 bytes.
    return write_header(tmp_path / "str.gguf", n_tensors=1, n_kv=1, tail=struct.pack("<Q", 2**60) + b"x" * 32)


def _gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def _bad_alignment(tmp_path: Path, value: str) -> Path:
    # general.alignment as a STRING (type 8), then one 4-float F32 tensor.
    kv = _gguf_string("general.alignment") + struct.pack("<I", 8) + _gguf_string(value)
    tensor = _gguf_string("t") + struct.pack("<IQIQ", 1, 4, 0, 0)
    return write_header(tmp_path / "align.gguf", n_tensors=1, n_kv=1, tail=kv + tensor + b"\0" * 256)


BAD_FILES = {
    "text": (lambda t, tmp: _text(tmp), "not a GGUF file"),
    "empty": (lambda t, tmp: _empty(tmp), "empty"),
    "truncated": (_truncated, "truncated"),
    "cut-in-header": (_cut_in_header, "truncated"),
    "absurd-tensor-count": (lambda t, tmp: _absurd_tensors(tmp), "corrupt"),
    "version-1": (lambda t, tmp: _version(tmp, 1), "version 1"),
    "version-99": (lambda t, tmp: _version(tmp, 99), "version 99"),
    "huge-string": (lambda t, tmp: _huge_string(tmp), "truncated"),
    "bad-alignment": (lambda t, tmp: _bad_alignment(tmp, "abc"), "general.alignment"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_inspect_rejects_bad_file(kind: str, tiny_gguf: Path, tmp_path: Path) -> None:
    make, words = BAD_FILES[kind]
    path = make(tiny_gguf, tmp_path)
    with pytest.raises(GGUFError) as info:
        gguf_info.inspect(path)
    assert words in info.value.message
    assert str(path) in info.value.message


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_pack_bad_file_exits_2_with_one_sentence(kind: str, tiny_gguf: Path, tmp_path: Path, cli, home: Path) -> None:
    make, words = BAD_FILES[kind]
    path = make(tiny_gguf, tmp_path)
    result = cli("pack", path, "--name", "bad")
    assert result.exit_code == 2, result
    assert result.stdout == ""
    assert_one_error(result.stderr)
    assert words in result.stderr
    assert manifests(home) == []


def test_missing_file_and_directory(cli, tmp_path: Path) -> None:
    for path, words in ((tmp_path / "nope.gguf", "does not exist"), (tmp_path, "directory")):
        result = cli("pack", path, "--name", "x")
        assert result.exit_code == 2, result
        assert_one_error(result.stderr)
        assert words in result.stderr


def test_error_with_markup_like_path_is_printed_plainly(cli, tmp_path: Path) -> None:
    folder = tmp_path / "x[/bold]"
    folder.mkdir(parents=True)
    path = folder / "t.gguf"
    path.write_text("hello")
    result = cli("pack", path, "--name", "x")
    assert result.exit_code == 2, result
    assert_one_error(result.stderr)
    assert "x[/bold]" in result.stderr
