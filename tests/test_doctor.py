"""mlserve doctor: facts about the build and machine, and each problem with the command that fixes it."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path

from mlserve.bundles.store import Store
from tests.conftest import CliResult

Cli = Callable[..., CliResult]


def _store_problems(report: dict[str, object]) -> list[dict[str, str]]:
    problems = report["problems"]
    assert isinstance(problems, list)
    return [p for p in problems if "bundle" in p["problem"].lower() or "store" in p["problem"].lower()]


def test_empty_store_suggests_a_pull(cli: Cli) -> None:
    res = cli("doctor", "--json")
    assert res.exit_code == 1, res
    report = res.json()
    assert report["ok"] is False
    assert {"problem", "fix"} <= report["problems"][0].keys()
    assert any(p["fix"] == "mlserve pull gemma3-270m" for p in report["problems"])
    assert report["llama_cpp"]["ok"] is True and "CPU" in report["llama_cpp"]["system_info"]
    assert isinstance(report["llama_cpp"]["gpu_offload"], bool)
    assert report["cores"]["usable"] >= 1 and report["memory"]["total"] > 0 and report["disk"]["free"] > 0
    assert report["cpu"]["features"]  # avx2/neon... present or not
    assert "doctor found" in res.stderr


def test_healthy_store_and_table(cli: Cli, make_gguf: Callable[..., Path]) -> None:
    assert cli("pack", make_gguf(seed=3), "--name", "tiny").exit_code == 0
    res = cli("doctor", "--json")
    report = res.json()
    assert _store_problems(report) == []
    assert report["store"]["bundles"][0]["ref"] == "tiny:1" and report["store"]["bundles"][0]["ok"] is True
    assert res.exit_code == (1 if report["problems"] else 0)  # a GPU without offload would be a problem here
    table = cli("doctor")
    assert "llama.cpp" in table.stdout and "bundle tiny:1" in table.stdout and table.stdout.count("{") == 0


def test_damaged_bundle_comes_with_a_working_fix(cli: Cli, make_gguf: Callable[..., Path], home: Path) -> None:
    source = make_gguf(seed=4)
    assert cli("pack", source, "--name", "tiny").exit_code == 0
    bundle = Store(home).resolve("tiny:1")
    blob = Store(home).blob_path(bundle.model_sha256)
    blob.chmod(0o644)
    blob.write_bytes(b"GGUF" + b"\0" * 100)

    quick = cli("doctor", "--quick", "--json")
    assert _store_problems(quick.json()) == []  # --quick does not re-hash

    res = cli("doctor", "--json")
    assert res.exit_code == 1
    [problem] = _store_problems(res.json())
    assert "tiny:1 is damaged" in problem["problem"]
    assert problem["fix"].startswith("mlserve rm tiny:1 --force && mlserve pack ")
    for command in problem["fix"].split(" && "):
        argv = shlex.split(command)
        assert argv[0] == "mlserve"
        assert cli(*argv[1:]).exit_code == 0, command
    assert _store_problems(cli("doctor", "--json").json()) == []
