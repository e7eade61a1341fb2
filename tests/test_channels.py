"""Channels: promote, canary, rollback, history, the promotion gates, and rm of channel targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlserve.bundles.store import Store
from tests.support.storeutil import REPO, assert_one_error, flip_byte


def _pack(cli, path: Path, name: str = "m") -> dict:
    result = cli("pack", path, "--name", name, "--json")
    assert result.exit_code == 0, result
    return result.json()


@pytest.fixture
def two(cli, make_gguf) -> list[dict]:
    """m:1 and m:2, tiny GGUFs of different bytes."""
    return [_pack(cli, make_gguf(seed)) for seed in (1, 2)]


def _ok(cli, *args: str) -> dict:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result
    return result.json()


def _pointer(home: Path, channel: str = "production", name: str = "m") -> dict:
    return json.loads((home / "channels" / name / f"{channel}.json").read_text())


def _history(cli, *extra: str) -> list[dict]:
    return _ok(cli, "history", "m", *extra)


def test_promote_rollback_history(cli, two, home: Path) -> None:
    first = _ok(cli, "promote", "m:1", "--to", "production", "--reason", "initial release")
    assert first["from"] is None and first["to"] == {"version": "1", "digest": two[0]["digest"]}
    second = _ok(cli, "promote", "m:2", "--to", "production")
    assert second["from"]["version"] == "1" and second["to"]["version"] == "2"
    pointer = _pointer(home)
    assert pointer["version"] == "2" and pointer["previous"] == {"version": "1", "digest": two[0]["digest"]}
    assert _ok(cli, "show", "m")["version"] == "2"

    back = _ok(cli, "rollback", "m", "--channel", "production", "--reason", "p99 regression")
    assert (back["action"], back["from"]["version"], back["to"]["version"]) == ("rollback", "2", "1")
    assert _ok(cli, "show", "m@production")["version"] == "1"
    # A second rollback undoes the first, like `kubectl rollout undo`.
    assert _ok(cli, "rollback", "m", "--channel", "production")["to"]["version"] == "2"

    entries = _history(cli)
    assert [(e["action"], e["to"]["version"]) for e in entries] == [
        ("promote", "1"),
        ("promote", "2"),
        ("rollback", "1"),
        ("rollback", "2"),
    ]
    assert entries[0]["reason"] == "initial release" and entries[2]["reason"] == "p99 regression"
    for e in entries:
        assert {"time", "user", "channel", "from", "to", "reason", "action"} <= set(e)
        assert e["time"].endswith("Z") and e["user"] and e["channel"] == "production"
    lines = (home / "history" / "m.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [e["id"] for e in entries]

    table = cli("history", "m")
    assert table.exit_code == 0 and "p99 regression" in table.stdout and "rollback" in table.stdout

    from mlserve.security import audit

    records = [json.loads(line) for f in audit.log_files(audit.audit_dir()) for line in f.read_text().splitlines()]
    moves = [(r["event"], r["to"]["version"]) for r in records if r["event"].startswith("channel.")]
    assert moves == [
        ("channel.promote", "1"),
        ("channel.promote", "2"),
        ("channel.rollback", "1"),
        ("channel.rollback", "2"),
    ]
    assert audit.verify().ok


def test_channels_are_independent_and_history_filters(cli, two) -> None:
    _ok(cli, "promote", "m:1", "--to", "staging")
    _ok(cli, "promote", "m:2", "--to", "canary.eu-1")
    assert _ok(cli, "show", "m@staging")["version"] == "1"
    assert [e["channel"] for e in _history(cli, "--channel", "staging")] == ["staging"]
    assert len(_history(cli)) == 2


@pytest.mark.parametrize(
    "args",
    [
        ("promote", "m:1", "--to", "Prod"),
        ("promote", "m:1", "--to", "../x"),
        ("promote", "m:9", "--to", "production"),
        ("promote", "m:1", "--to", "production", "--canary", "0"),
        ("promote", "m:1", "--to", "production", "--canary", "100"),
        ("promote", "m:1", "--to", "production", "--slo", "ttft_ms=5"),
        ("rollback", "m", "--channel", "production"),
    ],
)
def test_bad_usage_exits_2(cli, two, home: Path, args: tuple[str, ...]) -> None:
    result = cli(*args)
    assert result.exit_code == 2, result
    assert_one_error(result.stderr)
    assert not (home / "channels").exists()


def test_rollback_without_previous_is_refused(cli, two) -> None:
    _ok(cli, "promote", "m:1", "--to", "production")
    result = cli("rollback", "m", "--channel", "production")
    assert result.exit_code == 2 and "no previous version" in result.stderr


def test_canary_promote_fully_or_roll_back(cli, two, home: Path) -> None:
    result = cli("promote", "m:2", "--to", "production", "--canary", "10")
    assert result.exit_code == 2 and "no version yet" in result.stderr  # nothing to compare a canary with
    _ok(cli, "promote", "m:1", "--to", "production")
    entry = _ok(cli, "promote", "m:2", "--to", "production", "--canary", "10", "--reason", "try v2")
    assert (entry["action"], entry["percent"]) == ("canary", 10)
    pointer = _pointer(home)
    assert pointer["version"] == "1" and pointer["canary"] == {
        "version": "2",
        "digest": two[1]["digest"],
        "percent": 10,
    }
    assert _ok(cli, "show", "m")["version"] == "1"  # NAME is the stable target
    assert _ok(cli, "show", "m:2")["channels"] == ["production"]

    refused = cli("rm", "m:2")  # a canary target counts as a target
    assert refused.exit_code == 2 and "production" in refused.stderr

    dropped = _ok(cli, "rollback", "m", "--channel", "production")
    assert (dropped["action"], dropped["from"]["version"], dropped["to"]["version"]) == ("rollback-canary", "2", "1")
    assert "canary" not in _pointer(home) and _pointer(home)["version"] == "1"

    _ok(cli, "promote", "m:2", "--to", "production", "--canary", "25")
    full = _ok(cli, "promote", "m:2", "--to", "production")
    assert full["action"] == "promote-canary"
    pointer = _pointer(home)
    assert pointer["version"] == "2" and "canary" not in pointer and pointer["previous"]["version"] == "1"


def test_rm_force_of_canary_keeps_the_channel(cli, two, home: Path) -> None:
    _ok(cli, "promote", "m:1", "--to", "production")
    _ok(cli, "promote", "m:2", "--to", "production", "--canary", "5")
    assert _ok(cli, "rm", "m:2", "--force")["channels_removed"] == ["production"]
    assert _pointer(home)["version"] == "1" and "canary" not in _pointer(home)


def _bench(tmp_path: Path, p99_ttft: float, failed: int = 0, digest: str | None = None, model: str = "m") -> Path:
    """A bench report as `mlserve bench --output` writes it; ``digest`` is the bundle it measured."""
    result = {"max_concurrency": 4, "completed": 10 - failed, "failed": failed, "num_prompts": 10}
    result.update({"p99_ttft_ms": p99_ttft, "median_e2el_ms": 900.0, "p99_e2el_ms": 1200.0, "p99_tpot_ms": 20.0})
    path = tmp_path / f"bench-{p99_ttft}-{failed}-{(digest or 'none')[7:19]}-{model}.json"
    env = {} if digest is None else {"bundle_digest": digest}
    path.write_text(json.dumps({"target": "x", "model": model, "env": env, "results": [result]}))
    return path


def test_require_bench_gate(cli, two, home: Path, tmp_path: Path) -> None:
    _ok(cli, "promote", "m:1", "--to", "production")
    before = _pointer(home)
    m2 = two[1]["digest"]
    for bench, slo in [
        (_bench(tmp_path, 650.0, digest=m2), "ttft_ms=500"),
        (_bench(tmp_path, 100.0, failed=1, digest=m2), "e2el_ms=5000"),
    ]:
        result = cli("promote", "m:2", "--to", "production", "--require-bench", bench, "--slo", slo)
        assert result.exit_code == 1, result
        assert_one_error(result.stderr)
        assert _pointer(home) == before
    assert (
        "p99 ttft_ms 650"
        in cli(
            "promote",
            "m:2",
            "--to",
            "production",
            "--require-bench",
            _bench(tmp_path, 650.0, digest=m2),
            "--slo",
            "ttft_ms=500",
        ).stderr
    )
    assert len(_history(cli)) == 1

    good = _bench(tmp_path, 120.0, digest=m2)
    _ok(
        cli,
        "promote",
        "m:2",
        "--to",
        "production",
        "--require-bench",
        good,
        "--slo",
        "ttft_ms=500",
        "--slo",
        "e2el_ms=2000",
    )
    assert _pointer(home)["version"] == "2"

    missing = cli("promote", "m:1", "--to", "production", "--require-bench", tmp_path / "nope.json")
    assert missing.exit_code == 2


def test_check_gate_loads_and_refuses_corrupt_or_broken(cli, two, home: Path, tmp_path: Path) -> None:
    ok = cli("promote", "m:1", "--to", "production", "--check")
    assert ok.exit_code == 0, ok
    assert "smoke check ok" in ok.stderr

    store = Store()
    bundle = store.get("m", "2")
    assert bundle is not None
    flip_byte(store.blob_path(bundle.model_sha256), 4096)
    corrupt = cli("promote", "m:2", "--to", "production", "--check")
    assert corrupt.exit_code == 1, corrupt
    assert_one_error(corrupt.stderr)
    assert "sha256" in corrupt.stderr

    broken = _pack(cli, _broken_gguf(tmp_path))  # packs fine, but llama.cpp cannot load it
    refused = cli("promote", f"m:{broken['version']}", "--to", "production", "--check")
    assert refused.exit_code == 1, refused
    assert "smoke check failed" in refused.stderr
    assert _pointer(home)["version"] == "1" and len(_history(cli)) == 1


def _broken_gguf(tmp_path: Path) -> Path:
    """A tiny llama GGUF missing one tensor: valid GGUF, but llama.cpp refuses to load it."""
    from gguf import GGUFWriter

    from tests.support import ggufgen

    original = GGUFWriter.add_tensor

    def add_tensor(self, name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name != "blk.1.ffn_down.weight":
            original(self, name, *args, **kwargs)

    GGUFWriter.add_tensor = add_tensor  # type: ignore[method-assign]
    try:
        return ggufgen.write_tiny_llama(tmp_path / "broken.gguf", seed=7)
    finally:
        GGUFWriter.add_tensor = original  # type: ignore[method-assign]


def test_racing_promotes_leave_a_consistent_channel(cli, make_gguf, home: Path) -> None:
    versions = [_pack(cli, make_gguf(seed)) for seed in (1, 2, 3)]
    env = {**os.environ, "MLSERVE_HOME": str(home)}
    cmd = [sys.executable, "-m", "mlserve", "promote", "--to", "production", "--json"]
    procs = [
        subprocess.Popen([*cmd, f"m:{v}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for v in ("2", "3")
    ]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    entries = _history(cli)
    assert sorted(e["id"] for e in entries) == sorted(o["id"] for o in outs)
    first, last = entries
    # Serialised by the lock: the second saw the first's result as its "from".
    assert first["from"] is None and last["from"] == first["to"]
    pointer = _pointer(home)
    assert pointer["version"] == last["to"]["version"] and pointer["previous"] == first["to"]
    digests = {v["version"]: v["digest"] for v in versions}
    assert pointer["digest"] == digests[pointer["version"]]


def test_history_recovers_an_entry_lost_to_a_crash(cli, two, home: Path) -> None:
    _ok(cli, "promote", "m:1", "--to", "production")
    entry = _ok(cli, "promote", "m:2", "--to", "production")
    log = home / "history" / "m.jsonl"
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n" + lines[1][:20])  # the crash tore the last line after the pointer was written
    assert [e["id"] for e in _history(cli)][-1] == entry["id"]
    assert [json.loads(line)["action"] for line in log.read_text().splitlines()[-1:]] == ["promote"]
    nxt = _ok(cli, "rollback", "m", "--channel", "production")
    assert [e["id"] for e in _history(cli)][-2:] == [entry["id"], nxt["id"]]
