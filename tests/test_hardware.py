"""What the build needs vs what the host has: the child-process probe, CPU mismatch, memory fit, doctor and bench."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from mlserve.cli import bench_cmd
from mlserve.engine.llama import hardware
from mlserve.engine.llama.hardware import Facts, Probe
from mlserve.kit.cpu import PORTABLE_FIX
from tests.conftest import CliResult
from tests.support.ggufgen import N_EMBD, N_HEAD, N_HEAD_KV, N_LAYER

Cli = Callable[..., CliResult]
GIB = 1 << 30


def _facts(compiled: dict[str, bool] | None = None, dispatch: bool = False, gpus: int = 0, free: int = 0) -> Facts:
    devices = [{"name": "CPU", "description": "cpu", "kind": "cpu", "free": 8 * GIB, "total": 8 * GIB}]
    devices += [
        {"name": f"CUDA{i}", "description": "GPU", "kind": "gpu", "free": free, "total": free} for i in range(gpus)
    ]
    return Facts(
        version="0.3.36",
        system_info="CPU : " + " | ".join(f"{k} = {int(v)}" for k, v in (compiled or {}).items()),
        gpu_offload=gpus > 0,
        backends=("CUDA", "CPU") if gpus else ("CPU",),
        devices=tuple(devices),
        compiled=compiled or {},
        dispatch=dispatch,
    )


def test_probe_describes_this_build_from_a_child_process() -> None:
    found = hardware.probe()
    assert found.facts is not None, found.error
    facts = found.facts
    assert "CPU" in facts.backends and any(d["kind"] == "cpu" and d["total"] > 0 for d in facts.devices)
    assert facts.backend == ("CPU only" if not facts.gpu_offload else facts.backend)
    assert hardware.cpu_mismatch(facts) == []  # this build runs here, so it needs nothing the host lacks


def test_a_build_for_a_newer_cpu_is_reported_not_suffered(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nkill -ILL $$\n")  # what a -march=native build does on an older CPU
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    found = hardware.probe(str(fake))
    assert found.facts is None and found.illegal_instruction and "illegal instruction" in (found.error or "")


def test_cpu_mismatch_names_missing_features() -> None:
    built = _facts({"AVX2": True, "AVX512": True, "AVX512_VNNI": False, "LLAMAFILE": True})
    assert hardware.cpu_mismatch(built, host={"avx2", "fma"}) == ["avx512f"]
    assert hardware.cpu_mismatch(built, host={"avx2", "avx512f"}) == []
    assert hardware.cpu_mismatch(_facts({"AVX512": True}, dispatch=True), host={"sse2"}) == []  # picks a variant
    assert hardware.needed_features(built) == ["avx2", "avx512f"]


def test_kv_cache_bytes_follow_context_parallel_and_cache_type(tiny_gguf: Path) -> None:
    head = N_EMBD // N_HEAD
    per_cell_f16 = N_LAYER * 2 * head * N_HEAD_KV * 2  # K and V, f16
    assert hardware.kv_cache_bytes(tiny_gguf, 100 * 4) == 400 * per_cell_f16
    q8 = hardware.kv_cache_bytes(tiny_gguf, 400, "q8_0", "q8_0")
    assert q8 == int(400 * N_LAYER * 2 * head * N_HEAD_KV * 34 / 32)
    assert hardware.auto_layers(24, weights=GIB, kv=GIB, free=4 * GIB) == "all"
    assert hardware.auto_layers(24, weights=GIB, kv=GIB, free=GIB) == 12


def test_doctor_says_cpu_only_plainly(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "probe", lambda python=None: Probe(_facts({"AVX2": True})))
    res = cli("doctor", "--json", "--quick")
    build = res.json()["llama_cpp"]
    assert build["backend"] == "CPU only" and build["gpu_offload"] is False and build["cpu_needs"] == ["avx2"]
    table = cli("doctor", "--quick")
    assert "CPU only: this llama.cpp build has no GPU backend" in table.stdout


def test_doctor_reports_the_illegal_instruction_with_its_fix(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    crashed = Probe(None, "llama.cpp died with an illegal instruction: it was built for a newer CPU", True)
    monkeypatch.setattr(hardware, "probe", lambda python=None: crashed)
    res = cli("doctor", "--json", "--quick")
    assert res.exit_code == 1
    [problem] = [p for p in res.json()["problems"] if "illegal instruction" in p["problem"]]
    assert problem["fix"] == PORTABLE_FIX and "GGML_CPU_ALL_VARIANTS=ON" in problem["fix"]


def test_doctor_flags_a_cpu_feature_mismatch(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "probe", lambda python=None: Probe(_facts({"AVX512": True})))
    monkeypatch.setattr(hardware.sysinfo, "cpu_flags", lambda: {"avx2", "fma"})
    res = cli("doctor", "--json", "--quick")
    [problem] = [p for p in res.json()["problems"] if "avx512f" in p["problem"]]
    assert "this CPU lacks" in problem["problem"] and problem["fix"] == PORTABLE_FIX


def test_doctor_checks_weights_and_kv_cache_against_gpu_memory(
    cli: Cli, make_gguf: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("pack", make_gguf(seed=2), "--name", "tiny").exit_code == 0
    monkeypatch.setattr(hardware, "probe", lambda python=None: Probe(_facts(gpus=1, free=1 << 20)))
    res = cli("doctor", "--json", "--quick", "--ctx-size", "4096", "--parallel", "4")
    [row] = res.json()["store"]["bundles"]
    assert row["kv_cache"] == 4096 * 4 * N_LAYER * 2 * (N_EMBD // N_HEAD) * N_HEAD_KV * 2
    assert row["gpu_fit"]["fits"] is False and row["gpu_fit"]["device"] == "CUDA0"
    [problem] = [p for p in res.json()["problems"] if "CUDA0" in p["problem"]]
    assert "--gpu-layers auto" in problem["fix"]
    smaller = cli("doctor", "--json", "--quick", "--ctx-size", "64", "--parallel", "1")
    assert smaller.json()["store"]["bundles"][0]["gpu_fit"]["fits"] is True


def test_bench_env_records_the_device() -> None:
    device = bench_cmd._device()
    assert device["backend"] == hardware.facts().backend
    assert isinstance(device["cpu_needs"], list) and isinstance(device["cpu_has"], list)
    assert json.dumps(device)  # lands in --json as is


def _portable_wheel() -> Path | None:
    from mlserve.kit.baseline import BASELINES, kit_cache, matches

    found = [w for w in sorted((kit_cache() / "portable").glob("*.whl")) if matches(w, BASELINES["portable"])]
    return found[0] if found else None


@pytest.mark.skipif(
    _portable_wheel() is None, reason="no portable wheel in the kit cache (mlserve kit build builds one)"
)
def test_a_portable_build_loads_its_cpu_variant_and_decodes(tmp_path: Path, tiny_gguf: Path) -> None:
    wheel = _portable_wheel()
    assert wheel is not None
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = (
        "import json, sys; from pathlib import Path; from mlserve.engine.llama import hardware; "
        "from mlserve.engine.llama.model import LlamaModel; f = hardware.facts(); "
        "m = LlamaModel(Path(sys.argv[1]), n_ctx_seq=32, n_seq=1, n_threads=1); "
        "m.decode([1, 5], [0, 1], [0, 0], [False, True]); "
        "print(json.dumps({'dispatch': f.dispatch, 'info': f.system_info}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_gguf)], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    facts = json.loads(out.stdout)
    # Without mlserve loading the variants from llama_cpp/lib, llama.cpp finds no backend at all.
    assert facts["dispatch"] is True and "CPU :" in facts["info"]
