"""serve's GPU and KV-cache flags: every one is checked before the model loads (exit 2), on a CPU machine.

The "no GPU backend" cases need a CPU-only llama.cpp build (this one, and CI's); on a CUDA
build they are skipped, and the device-count checks are exercised through ``check_devices``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from mlserve.engine.llama.config import EngineConfig, load_model
from mlserve.engine.llama.factory import Overrides, build_info, gpu_settings
from mlserve.engine.llama.gpu import GpuSettings, check_devices, normalise, parse_gpu_layers, parse_tensor_split
from mlserve.engine.llama.model import LlamaModel, LoadParams
from mlserve.errors import EngineError, UsageError
from mlserve.sources.recipes import Defaults
from tests.conftest import CliResult

Cli = Callable[..., CliResult]
cpu_only = pytest.mark.skipif(build_info().gpu_offload, reason="this llama.cpp build has a GPU backend")


@pytest.fixture
def tiny(cli: Cli, make_gguf: Callable[..., Path]) -> str:
    assert cli("pack", make_gguf(seed=7), "--name", "tiny").exit_code == 0
    return "tiny"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cache-type-v", "q8_0"], "A quantized V cache (--cache-type-v q8_0) needs flash attention"),
        (["--cache-type-v", "q4_0", "--flash-attn", "off"], "needs flash attention, and --flash-attn is off"),
        (["--cache-type-k", "q3_k"], "--cache-type-k must be one of f32, f16"),
        (["--flash-attn", "sometimes"], "--flash-attn must be one of auto, off, on"),
        (["--split-mode", "diagonal"], "--split-mode must be one of none, layer, row"),
        (["--gpu-layers", "most"], "--gpu-layers must be auto, all or a number of layers"),
        (["--gpu-layers", "-2"], "a number of layers >= 0"),
        (["--tensor-split", "3,x"], "--tensor-split must be numbers separated by commas"),
        (["--tensor-split", "0,0"], "not all 0"),
        (["--main-gpu", "-1"], "--main-gpu must be a device index >= 0"),
        # head size 16 (the tiny model): q8_0's 32-value blocks cannot hold it; llama.cpp would fail later
        (["--cache-type-k", "q8_0"], "do not divide this model's attention head size of 16"),
    ],
)
def test_bad_values_exit_2_before_loading(cli: Cli, tiny: str, flags: list[str], message: str) -> None:
    res = cli("serve", tiny, "--port", "0", *flags)
    assert res.exit_code == 2, res
    assert message in res.stderr and "Traceback" not in res.stderr
    assert "serving" not in res.stderr  # refused before the server started


@cpu_only
@pytest.mark.parametrize(
    "flags",
    [
        ["--gpu-layers", "5"],
        ["--gpu-layers", "all"],
        ["--gpu-layers", "-1"],  # the old spelling of "all" keeps working (and is refused on a CPU build)
        ["--split-mode", "row"],
        ["--tensor-split", "1,1"],
        ["--main-gpu", "0"],
    ],
)
def test_offload_flags_on_a_cpu_only_build_exit_2(cli: Cli, tiny: str, flags: list[str]) -> None:
    res = cli("serve", tiny, "--port", "0", *flags)
    assert res.exit_code == 2, res
    assert "asks for GPU offload, but this llama.cpp build has no GPU backend (CPU only)" in res.stderr
    assert "make install GPU=cuda" in res.stderr


def test_device_checks() -> None:
    split = normalise(GpuSettings(gpu_layers="all", tensor_split=(3.0, 1.0)))
    with pytest.raises(UsageError, match="--tensor-split has 2 shares but this machine has 1 GPU"):
        check_devices(split, gpu_offload=True, gpus=1)
    check_devices(split, gpu_offload=True, gpus=2)  # one share per GPU: accepted
    with pytest.raises(UsageError, match="--main-gpu 2 does not exist"):
        check_devices(normalise(GpuSettings(main_gpu=2)), gpu_offload=True, gpus=2)
    with pytest.raises(UsageError, match="finds no device"):
        check_devices(normalise(GpuSettings(gpu_layers=10)), gpu_offload=True, gpus=0)
    check_devices(normalise(GpuSettings(gpu_layers="auto")), gpu_offload=False, gpus=0)  # auto never insists


def test_parsing_keeps_the_old_integer_spelling() -> None:
    assert parse_gpu_layers("-1") == "all" and parse_gpu_layers(-1) == "all"
    assert parse_gpu_layers("0") == 0 and parse_gpu_layers(" 12 ") == 12
    assert parse_gpu_layers("AUTO") == "auto"
    assert parse_tensor_split("3, 1") == (3.0, 1.0)


@cpu_only
def test_recipe_gpu_defaults_run_on_the_cpu_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    defaults = {"gpu_layers": -1, "split_mode": "layer", "flash_attn": "on", "cache_type_k": "bf16"}
    with caplog.at_level(logging.WARNING):
        settings = gpu_settings(Overrides(), defaults)
    assert settings.gpu_layers == 0 and settings.split_mode is None
    assert settings.flash_attn == "on" and settings.cache_type_k == "bf16"  # non-GPU settings still apply
    assert "running on the CPU" in caplog.text
    with pytest.raises(UsageError, match="no GPU backend"):  # the same asked on the command line: refused
        gpu_settings(Overrides(gpu_layers="all"), defaults)
    assert gpu_settings(Overrides(flash_attn="off"), defaults).flash_attn == "off"  # a flag beats the recipe


def test_recipe_defaults_carry_gpu_keys_only_when_set() -> None:
    assert "flash_attn" not in Defaults().model_dump()  # manifests without GPU defaults read as before
    dumped = Defaults(flash_attn="on", cache_type_v="q8_0", tensor_split=[1, 1]).model_dump()
    assert dumped["flash_attn"] == "on" and dumped["cache_type_v"] == "q8_0" and dumped["tensor_split"] == [1, 1]
    with pytest.raises(ValueError, match="quantized cache_type_v needs flash_attn: on"):
        Defaults(cache_type_v="q4_0")


def test_load_params_reach_llama_cpp(tiny_gguf: Path) -> None:
    # A setting llama.cpp honours: a K cache whose blocks do not divide the head size fails the context.
    with pytest.raises(EngineError, match="could not create a context"):
        LlamaModel(tiny_gguf, n_ctx_seq=32, n_seq=1, n_threads=1, load=LoadParams(flash_attn=1, type_k=8))
    cfg = EngineConfig(
        model_path=tiny_gguf,
        model_id="tiny",
        ctx_size=64,
        parallel=2,
        gpu_layers="auto",  # no GPU here: 0 layers, no error
        gpu=GpuSettings(flash_attn="on", cache_type_k="bf16", cache_type_v="f32"),
    )
    model = load_model(cfg)
    try:
        model.decode([1, 5, 6], [0, 1, 2], [0, 0, 0], [False, False, True])
        assert model.logits(2).shape == (model.n_vocab,)
    finally:
        model.close()
