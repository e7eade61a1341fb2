"""export and import: one-file transfer that refuses every unsafe or damaged archive."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests.support.storeutil import assert_one_error, blobs, flip_byte, manifests, snapshot, tmp_files


def _pack(cli, path: Path, name: str, *extra: str) -> dict:
    result = cli("pack", path, "--name", name, "--json", *extra)
    assert result.exit_code == 0, result
    return result.json()


def _use_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    monkeypatch.setenv("MLSERVE_HOME", str(home))
    return home


@pytest.fixture
def exported(cli, make_gguf, tmp_path: Path) -> tuple[dict, Path]:
    """A bundle packed in the test's home and exported to a tar."""
    doc = _pack(cli, make_gguf(3), "tiny", "--version", "1.0")
    out = tmp_path / "out" / "tiny.tar"
    result = cli("export", "tiny:1.0", "-o", out, "--json")
    assert result.exit_code == 0, result
    assert result.json()["digest"] == doc["digest"]
    assert result.json()["size"] == out.stat().st_size
    return doc, out


def _members(archive: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def _write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info


def test_export_contents(exported) -> None:
    doc, out = exported
    names = [m.name for m, _ in _members(out)]
    assert names == ["manifest.json", f"blobs/sha256-{doc['files'][0]['sha256']}"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_export_import_roundtrip_keeps_digest(cli, exported, tmp_path: Path, monkeypatch) -> None:
    doc, out = exported
    other = _use_home(monkeypatch, tmp_path / "other-home")
    result = cli("import", out, "--json")
    assert result.exit_code == 0, result
    got = result.json()
    assert (got["name"], got["version"], got["digest"], got["created"]) == ("tiny", "1.0", doc["digest"], True)
    assert cli("verify", "tiny:1.0").exit_code == 0
    assert cli("show", doc["digest"], "--json").json()["version"] == "1.0"
    state = snapshot(other)

    again = cli("import", out, "--json")
    assert again.exit_code == 0, again
    assert again.json()["created"] is False and again.json()["digest"] == doc["digest"]
    assert snapshot(other) == state
    assert tmp_files(other) == []


def test_import_real_gemma_roundtrip(cli, gemma_path: Path, tmp_path: Path, monkeypatch) -> None:
    doc = _pack(cli, gemma_path, "gemma3-270m")
    out = tmp_path / "gemma.tar"
    assert cli("export", "gemma3-270m", "-o", out).exit_code == 0
    _use_home(monkeypatch, tmp_path / "airgap")
    result = cli("import", out, "--json")
    assert result.exit_code == 0, result
    assert result.json()["digest"] == doc["digest"]


def test_import_into_store_with_same_version_other_bytes_refused(cli, exported, make_gguf, tmp_path, monkeypatch):
    _doc, out = exported
    home = _use_home(monkeypatch, tmp_path / "other-home")
    _pack(cli, make_gguf(8), "tiny", "--version", "1.0")
    state = snapshot(home)
    result = cli("import", out)
    assert result.exit_code == 2, result
    assert_one_error(result.stderr)
    assert snapshot(home) == state
    assert tmp_files(home) == []


def test_export_refuses_damaged_bundle(cli, exported, tmp_path: Path, home: Path) -> None:
    (blob,) = blobs(home)
    flip_byte(blob, 500)
    target = tmp_path / "broken.tar"
    result = cli("export", "tiny:1.0", "-o", target)
    assert result.exit_code == 2, result
    assert_one_error(result.stderr)
    assert not target.exists()


def _bad_archives(doc: dict, good: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Each bad archive with a word its refusal must contain."""
    (manifest_info, manifest), (blob_info, blob) = _members(good)
    blob_name = blob_info.name
    m = lambda: _file("manifest.json")  # noqa: E731
    b = lambda name=blob_name: _file(name)  # noqa: E731
    cases: dict[str, tuple[list[tuple[tarfile.TarInfo, bytes | None]], str]] = {}
    cases["dotdot"] = ([(m(), manifest), (b(), blob), (_file("../x"), b"evil")], "..")
    cases["dotdot-inside"] = ([(m(), manifest), (_file("blobs/../../x"), b"evil"), (b(), blob)], "..")
    cases["absolute"] = ([(m(), manifest), (b(), blob), (_file("/tmp/mlserve-evil"), b"evil")], "absolute")
    sym = tarfile.TarInfo(blob_name)
    sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
    cases["symlink"] = ([(m(), manifest), (sym, None)], "link")
    hard = tarfile.TarInfo("blobs/sha256-" + "0" * 64)
    hard.type, hard.linkname = tarfile.LNKTYPE, blob_name
    cases["hardlink"] = ([(m(), manifest), (b(), blob), (hard, None)], "link")
    dev = tarfile.TarInfo("blobs/sha256-" + "1" * 64)
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    cases["device"] = ([(m(), manifest), (b(), blob), (dev, None)], "not a regular file")
    fifo = tarfile.TarInfo("manifest.json")
    fifo.type = tarfile.FIFOTYPE
    cases["fifo"] = ([(fifo, None), (b(), blob)], "not a regular file")
    folder = tarfile.TarInfo("blobs")
    folder.type = tarfile.DIRTYPE
    cases["directory"] = ([(folder, None), (m(), manifest), (b(), blob)], "not a regular file")
    flipped = bytearray(blob)
    flipped[len(flipped) // 2] ^= 0xFF
    cases["wrong-hash"] = ([(m(), manifest), (b(), bytes(flipped))], "sha256")
    cases["missing-blob"] = ([(m(), manifest)], "lacks the blob")
    cases["no-manifest"] = ([(b(), blob)], "no manifest.json")
    cases["extra-file"] = ([(m(), manifest), (b(), blob), (_file("README"), b"hi")], "unexpected file")
    cases["bad-manifest"] = ([(m(), b"{not json"), (b(), blob)], "manifest")
    cases["manifest-bad-name"] = ([(m(), manifest.replace(b'"name":"tiny"', b'"name":"../../x"')), (b(), blob)], "name")
    size = str(doc["files"][0]["size"]).encode()
    wrong_size = manifest.replace(b'"size":' + size, b'"size":' + str(int(size) + 1).encode())
    cases["size-mismatch"] = ([(m(), wrong_size), (b(), blob)], "bytes")
    cases["two-manifests"] = ([(m(), manifest), (b(), blob), (m(), manifest)], "twice")
    out: dict[str, tuple[Path, str]] = {k: (_write_tar(tmp / f"{k}.tar", v[0]), v[1]) for k, v in cases.items()}
    text = tmp / "text.tar"
    text.write_text("not a tar at all\n" * 100)
    out["not-a-tar"] = (text, "not a readable tar")
    cut = tmp / "cut.tar"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out["truncated"] = (cut, "tar")
    out["missing-file"] = (tmp / "nope.tar", "does not exist")
    return out


BAD = [
    "dotdot", "dotdot-inside", "absolute", "symlink", "hardlink", "device", "fifo", "directory", "wrong-hash",
    "missing-blob", "no-manifest", "extra-file", "bad-manifest", "manifest-bad-name", "size-mismatch",
    "two-manifests", "not-a-tar", "truncated", "missing-file",
]  # fmt: skip


@pytest.mark.parametrize("kind", BAD)
def test_bad_archive_refused_and_store_unchanged(cli, exported, tmp_path: Path, monkeypatch, kind: str) -> None:
    doc, good = exported
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    path, words = _bad_archives(doc, good, bad_dir)[kind]
    home = _use_home(monkeypatch, tmp_path / "fresh")
    result = cli("import", path, "--json")
    assert result.exit_code == 2, result
    assert result.stdout == ""
    assert_one_error(result.stderr)
    assert words in result.stderr
    assert manifests(home) == [] and blobs(home) == []
    assert tmp_files(home) == []
    assert cli("list", "--json").json() == []
    assert not Path("/tmp/mlserve-evil").exists()
    assert not (tmp_path / "x").exists()


def test_bad_archive_leaves_populated_store_unchanged(cli, exported, make_gguf, tmp_path, monkeypatch) -> None:
    doc, good = exported
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    archives = _bad_archives(doc, good, bad_dir)
    home = _use_home(monkeypatch, tmp_path / "busy")
    _pack(cli, make_gguf(11), "keep")
    state = snapshot(home)
    for kind in ("wrong-hash", "symlink", "missing-blob", "dotdot"):
        result = cli("import", archives[kind][0])
        assert result.exit_code == 2, (kind, result)
        assert snapshot(home) == state, kind
        assert tmp_files(home) == [], kind


def test_archive_with_unlisted_extra_blob_imports_only_named_blobs(cli, exported, make_gguf, tmp_path, monkeypatch):
    doc, good = exported
    extra_bytes = make_gguf(12).read_bytes()
    import hashlib

    extra = _file("blobs/sha256-" + hashlib.sha256(extra_bytes).hexdigest())
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [(_file(i.name), d) for i, d in _members(good)]
    path = _write_tar(tmp_path / "extra.tar", [*members, (extra, extra_bytes)])
    home = _use_home(monkeypatch, tmp_path / "fresh")
    result = cli("import", path, "--json")
    assert result.exit_code == 0, result
    assert [b.name for b in blobs(home)] == [f"sha256-{doc['files'][0]['sha256']}"]
    assert tmp_files(home) == []
