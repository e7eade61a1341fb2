"""pack: validation, idempotence, automatic and explicit versions, immutability."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from mlserve.bundles.store import Store
from tests.support.storeutil import assert_one_error, blobs, manifests, snapshot, tmp_files


def test_pack_real_gemma_twice_gives_one_version(cli, gemma_path: Path, home: Path) -> None:
    first = cli("pack", gemma_path, "--name", "gemma3-270m", "--json")
    assert first.exit_code == 0, first
    doc = first.json()
    assert (doc["name"], doc["version"], doc["created"]) == ("gemma3-270m", "1", True)
    assert doc["digest"].startswith("sha256:") and len(doc["digest"]) == 71
    assert doc["files"][0]["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert doc["files"][0]["size"] == 253_113_024
    assert doc["gguf"]["architecture"] == "gemma3"

    second = cli("pack", gemma_path, "--name", "gemma3-270m", "--json")
    assert second.exit_code == 0, second
    assert second.json()["created"] is False
    assert second.json()["digest"] == doc["digest"]
    assert manifests(home) == ["gemma3-270m/1.json"]
    assert len(blobs(home)) == 1
    assert tmp_files(home) == []


def test_blobs_are_read_only_and_named_by_hash(cli, tiny_gguf: Path, home: Path) -> None:
    doc = cli("pack", tiny_gguf, "--name", "tiny", "--json").json()
    (blob,) = blobs(home)
    assert blob.name == "sha256-" + doc["files"][0]["sha256"]
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert blob.read_bytes() == tiny_gguf.read_bytes()


def test_manifest_is_canonical_and_digest_matches(cli, tiny_gguf: Path, home: Path) -> None:
    import hashlib

    doc = cli("pack", tiny_gguf, "--name", "tiny", "--json").json()
    data = (home / "manifests" / "tiny" / "1.json").read_bytes()
    assert doc["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_pack_human_output_goes_to_stderr(cli, tiny_gguf: Path) -> None:
    result = cli("pack", tiny_gguf, "--name", "tiny")
    assert result.exit_code == 0, result
    assert result.stdout == ""
    assert "tiny:1" in result.stderr


def test_auto_versions_count_up_per_name(cli, make_gguf) -> None:
    versions = []
    for seed in range(3):
        versions.append(cli("pack", make_gguf(seed), "--name", "a", "--json").json()["version"])
    other = cli("pack", make_gguf(9), "--name", "b", "--json").json()["version"]
    assert versions == ["1", "2", "3"]
    assert other == "1"
    # Re-packing an older file returns its version instead of adding one.
    again = cli("pack", make_gguf(0, name="copy.gguf"), "--name", "a", "--json").json()
    assert (again["version"], again["created"]) == ("1", False)
    assert cli("pack", make_gguf(4), "--name", "a", "--json").json()["version"] == "4"


def test_auto_version_follows_highest_number(cli, make_gguf) -> None:
    assert cli("pack", make_gguf(0), "--name", "a", "--version", "7").exit_code == 0
    assert cli("pack", make_gguf(1), "--name", "a", "--version", "beta").exit_code == 0
    assert cli("pack", make_gguf(2), "--name", "a", "--json").json()["version"] == "8"


def test_same_bytes_same_explicit_version_is_noop(cli, tiny_gguf: Path, home: Path) -> None:
    a = cli("pack", tiny_gguf, "--name", "t", "--version", "1.0", "--json")
    state = snapshot(home)
    b = cli("pack", tiny_gguf, "--name", "t", "--version", "1.0", "--json")
    assert a.exit_code == b.exit_code == 0
    assert b.json()["created"] is False and b.json()["digest"] == a.json()["digest"]
    assert snapshot(home) == state


def test_different_bytes_under_existing_version_refused(cli, make_gguf, home: Path) -> None:
    assert cli("pack", make_gguf(0), "--name", "t", "--version", "1.0").exit_code == 0
    state = snapshot(home)
    result = cli("pack", make_gguf(1), "--name", "t", "--version", "1.0", "--json")
    assert result.exit_code == 2, result
    assert result.stdout == ""
    assert_one_error(result.stderr)
    assert "t:1.0 already exists" in result.stderr
    assert snapshot(home) == state
    assert tmp_files(home) == []


def test_same_bytes_under_new_explicit_version_shares_blob(cli, tiny_gguf: Path, home: Path) -> None:
    assert cli("pack", tiny_gguf, "--name", "t").exit_code == 0
    result = cli("pack", tiny_gguf, "--name", "t", "--version", "2")
    assert result.exit_code == 0, result
    assert manifests(home) == ["t/1.json", "t/2.json"]
    assert len(blobs(home)) == 1


@pytest.mark.parametrize(
    "name", ["Gemma", "-x", ".x", "a/b", "a b", "", "x" * 65, "caf\u00e9", "../evil", "a:b", "a@b"]
)
def test_invalid_names_exit_2(cli, tiny_gguf: Path, home: Path, name: str) -> None:
    result = cli("pack", tiny_gguf, "--name", name)
    assert result.exit_code == 2, result
    assert "Traceback" not in result.stderr
    assert manifests(home) == [] and blobs(home) == []


@pytest.mark.parametrize("version", ["-1", ".1", "1/2", "../1", "1 2", "", "v" * 65, "1:2", "1@2"])
def test_invalid_versions_exit_2(cli, tiny_gguf: Path, home: Path, version: str) -> None:
    result = cli("pack", tiny_gguf, "--name", "ok", "--version", version)
    assert result.exit_code == 2, result
    assert "Traceback" not in result.stderr
    assert manifests(home) == [] and blobs(home) == []


@pytest.mark.parametrize("name", ["a", "gemma3-270m", "x.y_z-1", "0" + "a" * 63])
def test_valid_names_accepted(cli, tiny_gguf: Path, name: str) -> None:
    result = cli("pack", tiny_gguf, "--name", name, "--version", "A.b_c+d-1", "--json")
    assert result.exit_code == 0, result
    assert (result.json()["name"], result.json()["version"]) == (name, "A.b_c+d-1")


def test_stale_tmp_of_old_versions_waits_out_the_grace_period(cli, tiny_gguf: Path, home: Path) -> None:
    """pid-tagged files (older mlserve, no flock): a pid can name a live writer in another container."""
    from mlserve.bundles.staging import GRACE_S

    tmp = home / "tmp"
    tmp.mkdir(parents=True)
    old = time.time() - GRACE_S - 60
    dead_old = tmp / ".blob-999999999-abc"  # no such pid here, untouched for longer than the grace period
    dead_old.write_bytes(b"half a blob")
    os.utime(dead_old, (old, old))
    dead_fresh = tmp / ".blob-999999998-abc"  # may be a live writer in another PID namespace
    dead_fresh.write_bytes(b"being written elsewhere")
    live_old = tmp / f".blob-{os.getpid()}-abc"  # alive here: kept however old
    live_old.write_bytes(b"being written")
    os.utime(live_old, (old, old))
    crashed_write = tmp / ".write-999999997-abc"  # atomic writes happen under the store lock: stale now
    crashed_write.write_bytes(b"{")
    assert cli("pack", tiny_gguf, "--name", "t").exit_code == 0
    assert not dead_old.exists() and not crashed_write.exists()
    assert dead_fresh.exists() and live_old.exists()


def test_store_api_pack_matches_cli(tiny_gguf: Path, home: Path) -> None:
    from mlserve.bundles.packing import pack_file

    bundle, created = pack_file(Store(), tiny_gguf, "api")
    assert created and bundle.ref == "api:1"
    assert Store().resolve("api").digest == bundle.digest
    assert Store().root == home


@pytest.mark.parametrize("link", [False, True])
def test_failed_staging_leaves_no_temp_and_source_intact(make_gguf, home: Path, link: bool) -> None:
    src = make_gguf(5)
    original = src.read_bytes()
    store = Store()

    def boom(n: int) -> None:
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError):
        store.stage_file(src, boom, link=link)
    assert tmp_files(home) == []
    assert src.read_bytes() == original

    staged = store.stage_file(src, link=link)
    assert staged.size == len(original)
    assert staged.path.read_bytes() == original
    staged.path.unlink()
