"""verify: re-hash every blob; exit 1 naming the damaged bundle."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.storeutil import assert_one_error, blobs, flip_byte


def _pack(cli, path: Path, name: str, *extra: str) -> dict:
    result = cli("pack", path, "--name", name, "--json", *extra)
    assert result.exit_code == 0, result
    return result.json()


def test_verify_intact_store(cli, make_gguf) -> None:
    _pack(cli, make_gguf(0), "a")
    _pack(cli, make_gguf(1), "b")
    result = cli("verify", "--json")
    assert result.exit_code == 0, result
    doc = result.json()
    assert doc["ok"] is True
    assert [b["ref"] for b in doc["bundles"]] == ["a:1", "b:1"]
    for entry in doc["bundles"]:
        assert set(entry) >= {"ref", "digest", "ok", "problems"}
        assert entry["ok"] is True and entry["problems"] == []
        assert entry["digest"].startswith("sha256:")
    human = cli("verify")
    assert human.exit_code == 0 and human.stdout == ""
    assert "a:1" in human.stderr and "b:1" in human.stderr


def test_verify_empty_store(cli) -> None:
    result = cli("verify", "--json")
    assert result.exit_code == 0, result
    assert result.json() == {"ok": True, "bundles": []}


def test_flipped_byte_fails_verify_naming_bundle(cli, make_gguf, home: Path) -> None:
    a = _pack(cli, make_gguf(0), "a")
    _pack(cli, make_gguf(1), "b")
    blob = home / "blobs" / f"sha256-{a['files'][0]['sha256']}"
    flip_byte(blob, 1000)

    result = cli("verify")
    assert result.exit_code == 1, result
    assert "a:1" in result.stderr
    assert "Verification failed for a:1." in result.stderr
    assert "b:1." not in result.stderr.split("error:")[1]

    as_json = cli("verify", "--json")
    assert as_json.exit_code == 1, as_json
    doc = as_json.json()
    assert doc["ok"] is False
    status = {b["ref"]: b for b in doc["bundles"]}
    assert status["a:1"]["ok"] is False and "has sha256" in status["a:1"]["problems"][0]
    assert status["b:1"]["ok"] is True
    assert_one_error(as_json.stderr)

    # Verifying one REF only looks at that bundle.
    assert cli("verify", "b:1").exit_code == 0
    assert cli("verify", "a").exit_code == 1


def test_missing_blob_fails_verify(cli, tiny_gguf: Path, home: Path) -> None:
    _pack(cli, tiny_gguf, "t")
    (blob,) = blobs(home)
    os.chmod(blob, 0o644)
    blob.unlink()
    result = cli("verify", "--json")
    assert result.exit_code == 1, result
    (entry,) = result.json()["bundles"]
    assert entry["ref"] == "t:1" and "missing" in entry["problems"][0]
    assert "t:1" in result.stderr


def test_truncated_blob_fails_verify(cli, tiny_gguf: Path, home: Path) -> None:
    _pack(cli, tiny_gguf, "t")
    (blob,) = blobs(home)
    os.chmod(blob, 0o644)
    os.truncate(blob, 100)
    assert cli("verify", "t").exit_code == 1


def test_verify_unknown_ref_exits_2(cli) -> None:
    result = cli("verify", "nothing:1")
    assert result.exit_code == 2, result
    assert_one_error(result.stderr)


def test_damaged_manifest_is_a_clear_error(cli, tiny_gguf: Path, home: Path) -> None:
    _pack(cli, tiny_gguf, "t")
    (home / "manifests" / "t" / "1.json").write_text("{not json")
    result = cli("list", "--json")
    assert result.exit_code == 2, result
    assert_one_error(result.stderr)
    assert "damaged" in result.stderr
