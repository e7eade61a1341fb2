"""REF resolution, show and list output, and rm."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlserve.bundles.store import Store
from tests.support.storeutil import assert_one_error, blobs, manifests, snapshot


def _pack(cli, path: Path, name: str, *extra: str) -> dict:
    result = cli("pack", path, "--name", name, "--json", *extra)
    assert result.exit_code == 0, result
    return result.json()


def _promote(name: str, version: str, channel: str) -> None:
    store = Store()
    with store.lock():
        bundle = store.get(name, version)
        assert bundle is not None
        store.set_channel(bundle, channel)


@pytest.fixture
def three(cli, make_gguf) -> list[dict]:
    """m:1, m:2, m:3 of different bytes."""
    return [_pack(cli, make_gguf(seed), "m") for seed in range(3)]


def _shown(cli, ref: str) -> dict:
    result = cli("show", ref, "--json")
    assert result.exit_code == 0, result
    return result.json()


def test_name_resolves_to_newest(cli, three) -> None:
    assert _shown(cli, "m")["version"] == "3"


def test_name_resolves_to_production_channel(cli, three) -> None:
    _promote("m", "2", "production")
    assert _shown(cli, "m")["version"] == "2"
    assert _shown(cli, "m")["channels"] == ["production"]
    _promote("m", "1", "staging")
    assert _shown(cli, "m")["version"] == "2"


def test_name_version_and_channel(cli, three) -> None:
    assert _shown(cli, "m:1")["digest"] == three[0]["digest"]
    _promote("m", "1", "canary")
    assert _shown(cli, "m@canary")["version"] == "1"
    _promote("m", "3", "canary")
    assert _shown(cli, "m@canary")["version"] == "3"


def test_digest_prefix(cli, three) -> None:
    digest = three[1]["digest"]
    assert _shown(cli, digest)["version"] == "2"
    assert _shown(cli, digest[:19])["version"] == "2"  # sha256: + 12 hex
    assert _shown(cli, digest.upper().replace("SHA256:", "sha256:"))["version"] == "2"


def test_ambiguous_digest_prefix_exits_2(cli, make_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlserve.bundles.store as store_mod

    # Make every digest share its first 20 hex digits so a 12-digit prefix is ambiguous.
    real = store_mod.digest_of
    monkeypatch.setattr(store_mod, "digest_of", lambda data: "sha256:" + "0" * 20 + real(data)[27:])
    _pack(cli, make_gguf(0), "m")
    _pack(cli, make_gguf(1), "m")
    result = cli("show", "sha256:" + "0" * 12)
    assert result.exit_code == 2, result
    assert_one_error(result.stderr)
    assert "matches 2 bundles" in result.stderr


@pytest.mark.parametrize(
    "ref",
    [
        "m:9",
        "nothing",
        "nothing:1",
        "m@production",
        "sha256:" + "f" * 64,
        "sha256:abc",
        "sha256:" + "0" * 11,
        "sha256:zzzzzzzzzzzzzz",
        "M",
        "m:../../x",
        "m@../x",
        "m:",
    ],
)
def test_bad_refs_exit_2(cli, three, ref: str) -> None:
    result = cli("show", ref)
    assert result.exit_code == 2, result
    assert result.stdout == ""
    assert_one_error(result.stderr)


def test_show_json_shape(cli, three) -> None:
    doc = _shown(cli, "m:2")
    assert {"name", "version", "digest", "files", "gguf", "serving", "provenance", "created_at", "channels"} <= set(doc)
    assert (doc["name"], doc["version"]) == ("m", "2")
    assert doc["gguf"]["architecture"] == "llama"


def test_show_human_readable(cli, three) -> None:
    result = cli("show", "m:2")
    assert result.exit_code == 0, result
    # Piped output is never cropped: the whole digest and file hash are there for scripts.
    assert "m:2" in result.stdout and three[1]["digest"] in result.stdout
    assert three[1]["files"][0]["sha256"] in result.stdout
    assert "\u2026" not in result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


def test_list_json_shape(cli, three, make_gguf) -> None:
    _pack(cli, make_gguf(7), "another")
    result = cli("list", "--json")
    assert result.exit_code == 0, result
    assert result.stderr == ""
    doc = json.loads(result.stdout)
    assert [(d["name"], d["version"]) for d in doc] == [("another", "1"), ("m", "1"), ("m", "2"), ("m", "3")]
    for entry in doc:
        assert entry["digest"].startswith("sha256:")
        assert "channels" in entry


def test_list_empty(cli) -> None:
    result = cli("list", "--json")
    assert result.exit_code == 0, result
    assert result.json() == []
    human = cli("list")
    assert human.exit_code == 0 and human.stdout == ""
    assert "No bundles" in human.stderr


def test_list_human_table(cli, three) -> None:
    result = cli("list")
    assert result.exit_code == 0, result
    rows = [line.split() for line in result.stdout.splitlines()]
    assert [r[:2] for r in rows] == [["NAME", "VERSION"], ["m", "1"], ["m", "2"], ["m", "3"]]
    assert three[2]["digest"][7:19] in result.stdout
    assert three[2]["created_at"] in result.stdout
    assert "\u2026" not in result.stdout


def test_rm_removes_version_and_unshared_blob(cli, three, home: Path) -> None:
    result = cli("rm", "m:2", "--json")
    assert result.exit_code == 0, result
    assert result.json()["removed"] == "m:2"
    assert manifests(home) == ["m/1.json", "m/3.json"]
    names = {b.name for b in blobs(home)}
    assert f"sha256-{three[1]['files'][0]['sha256']}" not in names
    assert len(names) == 2
    assert cli("verify").exit_code == 0


def test_rm_keeps_blob_shared_with_other_version(cli, tiny_gguf: Path, home: Path) -> None:
    _pack(cli, tiny_gguf, "t")
    _pack(cli, tiny_gguf, "t", "--version", "2")
    _pack(cli, tiny_gguf, "other")
    assert len(blobs(home)) == 1
    assert cli("rm", "t:1").exit_code == 0
    assert cli("rm", "t:2").exit_code == 0
    assert len(blobs(home)) == 1
    assert cli("verify", "other").exit_code == 0
    assert cli("rm", "other").exit_code == 0
    assert blobs(home) == [] and manifests(home) == []


def test_rm_refused_while_channel_points_at_it(cli, three, home: Path) -> None:
    _promote("m", "2", "production")
    state = snapshot(home)
    result = cli("rm", "m:2")
    assert result.exit_code == 2, result
    assert_one_error(result.stderr)
    assert "production" in result.stderr and "--force" in result.stderr
    assert snapshot(home) == state

    forced = cli("rm", "m:2", "--force", "--json")
    assert forced.exit_code == 0, forced
    assert forced.json()["channels_removed"] == ["production"]
    assert manifests(home) == ["m/1.json", "m/3.json"]
    assert not (home / "channels" / "m" / "production.json").exists()
    assert _shown(cli, "m")["version"] == "3"


def test_rm_unknown_exits_2(cli, three, home: Path) -> None:
    state = snapshot(home)
    result = cli("rm", "m:7")
    assert result.exit_code == 2, result
    assert snapshot(home) == state


def test_set_channel_rejects_bad_channel_name(three) -> None:
    from mlserve.errors import UsageError

    store = Store()
    bundle = store.get("m", "1")
    assert bundle is not None
    with store.lock(), pytest.raises(UsageError):
        store.set_channel(bundle, "../escape")


@pytest.mark.parametrize("command", ["pack", "list", "show", "verify", "rm", "export", "import"])
def test_every_store_command_has_help(cli, command: str) -> None:
    result = cli(command, "--help")
    assert result.exit_code == 0, result
    assert "Usage" in result.stdout and "--json" in result.stdout
