"""Review findings in the store (issue 11): import validation, hard-linked sources, shared tmp/, bench binding."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlserve.bundles.store import Store
from tests.support.fake_hub import running_hub
from tests.support.fake_openai import serve_in_thread
from tests.support.storeutil import REPO, assert_one_error, blobs, manifests, tmp_files


def _ok(cli, *args: str | Path) -> dict:
    result = cli(*args, "--json")
    assert result.exit_code == 0, result
    return result.json()


def _pointer(home: Path, name: str = "m", channel: str = "production") -> dict | None:
    path = home / "channels" / name / f"{channel}.json"
    return json.loads(path.read_text()) if path.exists() else None


# -- import validates every GGUF blob and bounds the serving defaults ----------------------------------
@pytest.fixture
def archive(cli, make_gguf, tmp_path: Path, monkeypatch) -> Iterator[tuple[bytes, bytes]]:
    """(manifest.json, blob) of an exported tiny bundle; MLSERVE_HOME then points at an empty store."""
    _ok(cli, "pack", make_gguf(4), "--name", "tiny", "--version", "1")
    out = tmp_path / "tiny.tar"
    assert cli("export", "tiny:1", "-o", out).exit_code == 0
    with tarfile.open(out) as tar:
        manifest, blob = (tar.extractfile(m).read() for m in tar.getmembers())  # type: ignore[union-attr]
    monkeypatch.setenv("MLSERVE_HOME", str(tmp_path / "airgap"))
    yield manifest, blob


def _tar(path: Path, manifest: dict[str, Any], blob: bytes) -> Path:
    """An archive as `mlserve export` writes it, for a manifest and blob of the test's choosing."""
    manifest["files"][0].update(sha256=hashlib.sha256(blob).hexdigest(), size=len(blob))
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in (("manifest.json", data), (f"blobs/sha256-{manifest['files'][0]['sha256']}", blob)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return path


def _refused(cli, path: Path, *words: str) -> None:
    home = Path(os.environ["MLSERVE_HOME"])
    result = cli("import", path, "--json")
    assert result.exit_code == 2, result
    assert result.stdout == ""
    assert_one_error(result.stderr)
    for word in words:
        assert word in result.stderr, result.stderr
    assert manifests(home) == [] and blobs(home) == [] and tmp_files(home) == []


def _lie(facts: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return {**facts, key: value}


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("not-gguf", ("not a GGUF file", "tiny-4.gguf")),
        ("truncated", ("truncated",)),
        ("context-length-lie", ("context_length", "1073741824")),
        ("architecture-lie", ("architecture",)),
        ("missing-fact", ("vocab_size",)),
    ],
)
def test_import_validates_gguf_blob(cli, archive, tmp_path: Path, case: str, words: tuple[str, ...]) -> None:
    raw_manifest, blob = archive
    manifest = json.loads(raw_manifest)
    if case == "not-gguf":
        blob = b"MZ this is not a model\n" * 4096  # hashes and sizes all agree: only inspection can tell
    elif case == "truncated":
        blob = blob[: len(blob) // 2]
    elif case == "context-length-lie":
        manifest["gguf"] = _lie(manifest["gguf"], "context_length", 1 << 30)
    elif case == "architecture-lie":
        manifest["gguf"] = _lie(manifest["gguf"], "architecture", "gemma3")
    else:
        del manifest["gguf"]["vocab_size"]
    _refused(cli, _tar(tmp_path / f"{case}.tar", manifest, blob), *words)


def test_import_of_a_faithful_rebuilt_archive_still_works(cli, archive, tmp_path: Path) -> None:
    raw_manifest, blob = archive
    manifest = json.loads(raw_manifest)
    manifest["serving"]["defaults"]["parallel"] = 4  # in bounds: the checks are not a blanket refusal
    doc = _ok(cli, "import", _tar(tmp_path / "ok.tar", manifest, blob))
    assert doc["serving"]["defaults"]["parallel"] == 4 and doc["gguf"] == manifest["gguf"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("parallel", 100_000),
        ("parallel", 0),
        ("parallel", "8"),
        ("parallel", True),
        ("ctx_size", 1 << 40),
        ("ctx_size", 8),
        ("threads", 0),
        ("gpu_layers", 1 << 40),
        ("max_tokens", -1),
        ("max_tokens", 2.5),
        ("temperature", float("nan")),
        ("top_p", 7.0),
    ],
)
def test_import_refuses_unbounded_serving_defaults(cli, archive, tmp_path: Path, key: str, value: Any) -> None:
    raw_manifest, blob = archive
    manifest = json.loads(raw_manifest)
    manifest["serving"]["defaults"][key] = value
    _refused(cli, _tar(tmp_path / "defaults.tar", manifest, blob), f"'{key}'")


def test_pack_refuses_recipe_defaults_outside_the_import_bounds(cli, make_gguf, tmp_path: Path, home: Path) -> None:
    """One bound check for pack and import: what pack stores, import accepts, and the other way round."""
    model = make_gguf(6)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nsha256: '{sha}'\nsources:\n  - path: {model}\ndefaults:\n  ctx_size: 8\n")
    result = cli("pack", model, "--name", "r", "--recipe", recipe)
    assert result.exit_code == 2, result
    assert_one_error(result.stderr)
    assert "'ctx_size'" in result.stderr
    assert manifests(home) == [] and blobs(home) == [] and tmp_files(home) == []


# -- a hard-linked source keeps its mode ---------------------------------------------------------------
def test_pack_leaves_hard_linked_source_mode_alone(make_gguf, home: Path) -> None:
    from mlserve.bundles.packing import pack_file

    src = make_gguf(7)
    os.chmod(src, 0o640)
    bundle, created = pack_file(Store(), src, "linked", link=True)
    blob = Store().blob_path(bundle.model_sha256)
    assert created and os.path.samefile(blob, src), "the hard-link path was not taken"
    assert stat.S_IMODE(src.stat().st_mode) == 0o640
    assert Store().verify(bundle) == [] and tmp_files(home) == []


def test_pull_from_hub_leaves_the_cache_file_mode_alone(cli, make_gguf, monkeypatch, home: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    with running_hub() as hub:
        sha = hub.add("acme/tiny-GGUF", "tiny.gguf", make_gguf(8).read_bytes())
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        _ok(cli, "pull", "hf://acme/tiny-GGUF/tiny.gguf")
    cached = Path(os.environ["HF_HOME"]) / "hub" / "models--acme--tiny-GGUF" / "blobs" / sha
    assert os.path.samefile(cached, home / "blobs" / f"sha256-{sha}")
    assert stat.S_IMODE(cached.stat().st_mode) == 0o666 & ~umask


# -- stale-temp cleanup in a MLSERVE_HOME shared across PID namespaces ---------------------------------
_WRITER = """
import os, sys
from pathlib import Path
os.getpid = lambda: 999999999  # how a writer in another PID namespace looks from here: a dead pid
from mlserve.bundles.store import Store
print(Store(Path(sys.argv[1])).temp_path("blob"), flush=True)
if sys.argv[2] == "hold":
    sys.stdin.read()
"""


def _writer(home: Path, mode: str) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(home), mode],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_stale_tmp_cleanup_spares_live_writer_in_other_pid_namespace(cli, tiny_gguf: Path, home: Path) -> None:
    live, live_file = _writer(home, "hold")
    try:
        dead, dead_file = _writer(home, "exit")
        assert dead.wait(30) == 0
        assert live_file.is_file() and dead_file.is_file()
        assert cli("pack", tiny_gguf, "--name", "t").exit_code == 0  # takes the store lock: sweeps tmp/
        assert live_file.exists(), "a live writer's staged file was deleted"
        assert not dead_file.exists(), "a dead writer's staged file was kept"
    finally:
        live.communicate("", timeout=30)
    assert cli("rm", "t:1").exit_code == 0  # its writer is gone now: the next sweep takes it
    assert not live_file.exists() and tmp_files(home) == []


# -- promote --require-bench is bound to the bundle it measured -----------------------------------------
@pytest.fixture
def two(cli, make_gguf) -> list[dict]:
    """m:1 on production, m:2 to promote."""
    docs = [_ok(cli, "pack", make_gguf(seed), "--name", "m") for seed in (1, 2)]
    _ok(cli, "promote", "m:1", "--to", "production")
    return docs


def _report(tmp_path: Path, env: dict[str, Any], model: str = "m") -> Path:
    result = {"max_concurrency": 1, "completed": 4, "failed": 0, "num_prompts": 4, "p99_ttft_ms": 50.0}
    path = tmp_path / f"bench-{len(list(tmp_path.glob('bench-*')))}.json"
    path.write_text(json.dumps({"target": "x", "model": model, "env": env, "results": [result]}))
    return path


def _promote(cli, report: Path, ref: str = "m:2") -> Any:
    return cli("promote", ref, "--to", "production", "--require-bench", report, "--slo", "ttft_ms=500")


def _assert_refused(result: Any, home: Path, *words: str) -> None:
    assert result.exit_code == 1, result
    assert_one_error(result.stderr)
    for word in words:
        assert word in result.stderr, result.stderr
    assert _pointer(home)["version"] == "1"  # type: ignore[index]


def test_promote_require_bench_refuses_other_digest(cli, two, home: Path, tmp_path: Path) -> None:
    m1 = two[0]["digest"]
    _assert_refused(_promote(cli, _report(tmp_path, {"bundle_digest": m1})), home, "another bundle", m1[:19])
    # What `mlserve bench URL --output` really writes, against a server that serves other bytes.
    with serve_in_thread() as (url, opts):
        opts.ready.set()
        out = tmp_path / "real.json"
        assert cli("bench", url, "-n", "2", "--output-len", "2", "--output", out).exit_code == 0
    _assert_refused(_promote(cli, out), home, "another bundle")
    # The right digest under another model's name is refused too.
    _assert_refused(_promote(cli, _report(tmp_path, {"bundle_digest": two[1]["digest"]}, "other:2")), home, "other")


def test_promote_require_bench_refuses_report_without_digest(cli, two, home: Path, tmp_path: Path) -> None:
    for env in ({}, {"bundle_digest": None}, {"bundle_digest": ""}):
        _assert_refused(_promote(cli, _report(tmp_path, env)), home, "bundle_digest")


def test_promote_require_bench_accepts_report_of_this_bundle(
    cli, two, make_gguf, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m2 = two[1]["digest"]
    for model in ("m", "m:2", "m@staging"):
        assert _promote(cli, _report(tmp_path, {"bundle_digest": m2}, model)).exit_code == 0
        assert _pointer(home)["version"] == "2"  # type: ignore[index]
        _ok(cli, "rollback", "m", "--channel", "production")
    # End to end: `mlserve bench URL --output` against a server whose /v1/models names this bundle's digest.
    import tests.support.fake_openai as fake

    bundle = _ok(cli, "pack", make_gguf(9), "--name", "fake")  # the fake server's model id is "fake"
    monkeypatch.setattr(fake, "DIGEST", bundle["digest"])
    with serve_in_thread() as (url, opts):
        opts.ready.set()
        out = tmp_path / "real.json"
        assert cli("bench", url, "-n", "2", "--output-len", "2", "--output", out).exit_code == 0
    assert json.loads(out.read_text())["env"]["bundle_digest"] == bundle["digest"]
    result = _promote(cli, out, "fake:1")
    assert result.exit_code == 0, result
    assert _pointer(home, "fake")["version"] == "1"  # type: ignore[index]
