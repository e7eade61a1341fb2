"""Crash safety: SIGKILL pack at random points; the store never lists a broken bundle. Concurrent packs."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.ggufgen import write_tiny_llama
from tests.support.storeutil import REPO, manifests, tmp_files

ITERATIONS = 10
MAX_DELAY = 1.5


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid ~54 MB llama GGUF (100k-token vocabulary), so a pack takes long enough to interrupt."""
    return write_tiny_llama(tmp_path_factory.mktemp("big") / "big.gguf", seed=0, vocab=100_000)


def _variant(base: Path, folder: Path, i: int) -> Path:
    """A copy of ``base`` whose last tensor bytes differ: still a valid GGUF, a different blob."""
    path = folder / f"variant-{i}.gguf"
    shutil.copyfile(base, path)
    with open(path, "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(i.to_bytes(4, "little"))
    return path


def _start_pack(path: Path, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mlserve", "pack", str(path), "--name", name, "--json"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _check_store(cli, home: Path) -> list[str]:
    """Every listed bundle verifies; every manifest file is whole. Returns the listed refs."""
    listed = cli("list", "--json")
    assert listed.exit_code == 0, listed
    refs = [f"{b['name']}:{b['version']}" for b in listed.json()]
    for ref in refs:
        result = cli("verify", ref)
        assert result.exit_code == 0, (ref, result)
    for rel in manifests(home):
        name, file = rel.split("/")
        assert file.endswith(".json") and not file.startswith("."), rel
        doc = json.loads((home / "manifests" / rel).read_bytes())
        assert (doc["name"], f"{doc['version']}.json") == (name, file)
    assert len(refs) == len(manifests(home))
    return refs


def test_sigkill_during_pack_never_leaves_a_broken_bundle(cli, big_gguf: Path, tmp_path: Path, home: Path) -> None:
    rng = random.Random(20240611)
    # Calibrate: one uninterrupted pack says how long a whole run takes on this machine, so the
    # kill points spread over start-up, hashing and commit whether the machine is fast or slow.
    started = time.monotonic()
    calibration = _start_pack(_variant(big_gguf, tmp_path, 10_000), "crash")
    _out, err = calibration.communicate(timeout=60)
    assert calibration.returncode == 0, err
    window = min((time.monotonic() - started) * 1.1, MAX_DELAY)
    killed, completed = 0, 1
    for i in range(ITERATIONS):
        variant = _variant(big_gguf, tmp_path, i)
        proc = _start_pack(variant, "crash")
        try:
            proc.wait(timeout=rng.uniform(0, window))  # the random kill point
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        _out, err = proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            killed += 1
        else:
            assert proc.returncode == 0, err
            completed += 1
        variant.unlink()
        _check_store(cli, home)
    assert killed >= 3, f"only {killed} of {ITERATIONS} packs were interrupted; the test proved little"

    # A clean pack still works, and the next locked operation clears every dead writer's temp file.
    clean = _variant(big_gguf, tmp_path, 999)
    proc = _start_pack(clean, "crash")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["created"] is True
    # A pack killed after its commit (while exiting) still made a version, so count what is listed.
    before = len(_check_store(cli, home)) - 1
    assert completed <= before and doc["version"] == str(before + 1)
    assert cli("rm", f"crash:{doc['version']}").exit_code == 0
    assert tmp_files(home) == []
    assert len(_check_store(cli, home)) == before


def test_concurrent_packs_get_distinct_versions(cli, big_gguf: Path, tmp_path: Path, home: Path) -> None:
    a, b = _variant(big_gguf, tmp_path, 1), _variant(big_gguf, tmp_path, 2)
    procs = [_start_pack(a, "race"), _start_pack(b, "race")]
    docs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        docs.append(json.loads(out))
    assert sorted(d["version"] for d in docs) == ["1", "2"]
    assert docs[0]["files"][0]["sha256"] != docs[1]["files"][0]["sha256"]
    assert sorted(_check_store(cli, home)) == ["race:1", "race:2"]
    assert tmp_files(home) == []


def test_installed_entry_point_runs_as_scripts_do(tiny_gguf: Path, home: Path) -> None:
    exe = Path(sys.executable).with_name("mlserve")
    if not exe.exists():
        pytest.skip("the mlserve console script is not installed next to this python")
    packed = subprocess.run([exe, "pack", tiny_gguf, "--name", "tiny", "--json"], capture_output=True, text=True)
    assert packed.returncode == 0, packed.stderr
    assert json.loads(packed.stdout)["version"] == "1"
    bad = subprocess.run([exe, "show", "nothing"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stdout == "" and "Traceback" not in bad.stderr and bad.stderr.startswith("error: ")


def _crashpoint(k: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "support" / "crashpoint.py"), str(k), *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _crashpoints(result: subprocess.CompletedProcess[str]) -> int:
    return int(result.stderr.rsplit("crashpoints=", 1)[1].split()[0])


@pytest.mark.parametrize("command", ["pack", "import"])
def test_kill_before_every_store_operation(cli, tiny_gguf: Path, tmp_path: Path, monkeypatch, command: str) -> None:
    """Deterministic: die before the 1st, 2nd, ... Nth file operation; never a broken listed bundle."""
    if command == "pack":
        args: tuple[str | Path, ...] = ("pack", tiny_gguf, "--name", "k", "--json")
    else:
        archive = tmp_path / "k.tar"
        assert cli("pack", tiny_gguf, "--name", "k").exit_code == 0
        assert cli("export", "k:1", "-o", archive).exit_code == 0
        args = ("import", archive, "--json")
    home = tmp_path / "crash-home"
    monkeypatch.setenv("MLSERVE_HOME", str(home))
    counted = _crashpoint(0, *args)
    assert counted.returncode == 0, counted.stderr
    total = _crashpoints(counted)
    assert total >= 8, counted.stderr  # lock, staging, blob, manifest: the hook does see the store's work
    for k in range(1, total + 1):
        shutil.rmtree(home)
        result = _crashpoint(k, *args)
        assert result.returncode == -signal.SIGKILL, (k, result.stderr)
        refs = _check_store(cli, home)
        assert refs in ([], ["k:1"]), (k, refs)
        # The next locked operation clears what the dead writer left in tmp.
        finish = cli(*args)
        assert finish.exit_code == 0, (k, finish)
        assert tmp_files(home) == [], k
        assert _check_store(cli, home) == ["k:1"]
