"""Air-gapped kits: built from this checkout, installed with no network (unshare -n), served; tampering refused.

The kit is built once per module with the native baseline so it reuses the llama-cpp-python
wheel that `make install` left in pip's cache (its ggml options are read from the wheel and must
say GGML_NATIVE=ON); installs run inside a network namespace that has no interface but a
down loopback, so a fetch would fail.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from mlserve.errors import UsageError
from mlserve.kit import baseline as bl
from mlserve.kit.install import KitMismatch, check_target
from tests.conftest import CliResult
from tests.support.ggufgen import write_tiny_llama
from tests.support.servers import ServerProcess

REPO = Path(__file__).resolve().parent.parent


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode == 0
    except OSError:
        return False


needs_netns = pytest.mark.skipif(not _unshare_works(), reason="unshare -n needs root (CI runs as root)")


def _mlserve(
    home: Path, *args: str, netns: bool = False, python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    cmd = [python, "-m", "mlserve", *args]
    env = {**os.environ, "MLSERVE_HOME": str(home)}
    return subprocess.run(
        ["unshare", "-n", *cmd] if netns else cmd, capture_output=True, text=True, env=env, cwd=home.parent, timeout=600
    )


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kit of this checkout with one tiny bundle (native baseline: pip's cached wheel)."""
    work = tmp_path_factory.mktemp("kit")
    home = work / "build-home"
    gguf = write_tiny_llama(work / "tiny.gguf")
    assert _mlserve(home, "pack", str(gguf), "--name", "tiny").returncode == 0
    out = _mlserve(
        home, "kit", "build", "tiny", "-o", str(work / "kit.tar"), "--baseline", "native", "--no-build", "--json"
    )
    if out.returncode != 0 and "No llama-cpp-python" in out.stderr:
        pytest.skip("pip's cache holds no native llama-cpp-python wheel (make install leaves one): " + out.stderr)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["llama_cpp"]["source"] == "pip-cache" and doc["llama_cpp"]["ggml"]["GGML_NATIVE"] == "ON"
    assert [b["ref"] for b in doc["bundles"]] == ["tiny:1"]
    return work / "kit.tar"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".kit-" in p.name or ".partial" in p.name)


@needs_netns
def test_kit_installs_offline_imports_and_serves(kit: Path, tmp_path: Path) -> None:
    home, venv = tmp_path / "site-home", tmp_path / "venv"
    res = _mlserve(home, "kit", "install", str(kit), "--venv", str(venv), "--json", netns=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["venv"] == str(venv) and report["bundles"][0]["name"] == "tiny"
    assert report["cpu_baseline"] == "native" and _leftovers(tmp_path) == []
    # The venv runs its own copy of mlserve, not this checkout's.
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mlserve, llama_cpp; print(mlserve.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert where.stdout.startswith(str(venv)), where.stdout
    command = [str(venv / "bin" / "mlserve")]
    flags = ("--parallel", "2", "--ctx-size", "256")
    with ServerProcess(home, ["tiny"], *flags, command=command, cwd=home, bind_timeout=120) as server:
        server.wait_ready(120)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
        resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-mlserve-model"] == "tiny:1" and resp.json()["usage"]["completion_tokens"] >= 1


def _flip(src: Path, dst: Path, at: int) -> None:
    data = bytearray(src.read_bytes())
    data[at] ^= 0x01
    dst.write_bytes(bytes(data))


def _member_offset(kit: Path, suffix: str) -> int:
    with tarfile.open(kit) as tar:
        member = next(m for m in tar if m.name.endswith(suffix))
        return member.offset_data + member.size // 2


@pytest.mark.parametrize("where", ["wheel", "bundle", "padding", "header"])
def test_one_altered_byte_is_refused_and_nothing_installed(kit: Path, tmp_path: Path, where: str) -> None:
    bad = tmp_path / "bad.tar"
    if where == "wheel":
        at = _member_offset(kit, ".whl")
    elif where == "bundle":
        at = _member_offset(kit, "tiny-1.tar")
    elif where == "padding":
        at = kit.stat().st_size - 10  # the end-of-archive zero blocks
    else:
        with tarfile.open(kit) as tar:
            at = next(m for m in tar if m.name.endswith("kit.json")).offset + 130  # inside its header
    _flip(kit, bad, at)
    home, venv = tmp_path / "site-home", tmp_path / "venv"
    res = _mlserve(home, "kit", "install", str(bad), "--venv", str(venv), netns=_unshare_works())
    assert res.returncode == 2, res.stderr
    assert "Nothing" in res.stderr or "altered" in res.stderr or "damaged" in res.stderr or "intact" in res.stderr
    assert not venv.exists() and _leftovers(tmp_path) == []
    assert not (home / "manifests").exists() or not any((home / "manifests").rglob("*.json"))


def _rewrite_manifest(kit: Path, out: Path, change: dict[str, object]) -> None:
    """A kit with kit.json changed and SHA256SUMS recomputed: internally consistent, for another target."""
    with tarfile.open(kit) as src, tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as dst:
        members = {m.name: (m, src.extractfile(m).read()) for m in src if m.isreg()}  # type: ignore[union-attr]
        manifest = json.loads(members["mlserve-kit/kit.json"][1])
        manifest.update(change)
        members["mlserve-kit/kit.json"] = (members["mlserve-kit/kit.json"][0], json.dumps(manifest).encode())
        sums = "".join(
            f"{hashlib.sha256(data).hexdigest()}  {name.removeprefix('mlserve-kit/')}\n"
            for name, (_, data) in sorted(members.items())
            if not name.endswith("SHA256SUMS")
        )
        members["mlserve-kit/SHA256SUMS"] = (members["mlserve-kit/SHA256SUMS"][0], sums.encode())
        for info, data in members.values():
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def test_kit_for_another_python_is_refused_before_installing(kit: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.tar"
    _rewrite_manifest(kit, other, {"python": {"version": "3.9", "implementation": "cpython"}})
    home, venv = tmp_path / "site-home", tmp_path / "venv"
    res = _mlserve(home, "kit", "install", str(other), "--venv", str(venv))
    assert res.returncode == 2 and "This kit is for cpython 3.9" in res.stderr, res.stderr
    assert not venv.exists() and _leftovers(tmp_path) == []


def test_install_script_refuses_an_altered_kit(kit: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    _flip(kit, bad, _member_offset(kit, ".whl"))
    with tarfile.open(bad) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    res = subprocess.run(
        ["sh", str(tmp_path / "x" / "mlserve-kit" / "install.sh"), str(tmp_path / "venv")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 2 and "damaged or altered" in res.stderr, res.stderr
    assert not (tmp_path / "venv").exists() and not (tmp_path / "venv.partial").exists()


def _manifest(**cpu: object) -> dict[str, object]:
    import platform

    libc, version = platform.libc_ver()
    return {
        "python": {"version": f"{sys.version_info[0]}.{sys.version_info[1]}", "implementation": "cpython"},
        "platform": {"system": platform.system(), "machine": platform.machine(), "libc": libc, "glibc": version},
        "cpu_baseline": {"name": "native", "needs": ["avx2", "avx512f"], **cpu},
    }


def test_target_checks_cpu_platform_and_libc() -> None:
    with pytest.raises(KitMismatch, match="avx512f, which this CPU lacks"):
        check_target(_manifest(), sys.executable, cpu_flags={"avx2", "sse2"})
    check_target(_manifest(), sys.executable, cpu_flags={"avx2", "avx512f"})  # has both: accepted
    newer = _manifest()
    newer["platform"] = {**newer["platform"], "glibc": "99.0"}  # type: ignore[dict-item]
    with pytest.raises(KitMismatch, match="glibc 99.0 or newer"):
        check_target(newer, sys.executable, cpu_flags={"avx2", "avx512f"})


def _fake_wheel(path: Path, options: dict[str, str], variants: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(bl.GGML_CONFIG, "".join(f'set({k} "{v}")\n' for k, v in options.items()))
        if variants:
            zf.writestr("llama_cpp/lib/libggml-cpu-haswell.so", b"")
    return path


def test_baselines_match_wheels_by_their_recorded_ggml_options(tmp_path: Path) -> None:
    native = _fake_wheel(tmp_path / "a.whl", {"GGML_NATIVE": "ON", "GGML_BACKEND_DL": "OFF", "GGML_CUDA": "OFF"})
    dl = {"GGML_NATIVE": "OFF", "GGML_BACKEND_DL": "ON", "GGML_CPU_ALL_VARIANTS": "ON", "GGML_CUDA": "OFF"}
    portable = _fake_wheel(tmp_path / "b.whl", dl, variants=True)
    stray = _fake_wheel(tmp_path / "c.whl", dl)  # variants installed outside llama_cpp/lib: unusable
    assert [n for n, b in bl.BASELINES.items() if bl.matches(native, b)] == ["native"]
    assert [n for n, b in bl.BASELINES.items() if bl.matches(portable, b)] == ["portable"]
    assert not any(bl.matches(stray, b) for b in bl.BASELINES.values())
    with pytest.raises(UsageError, match="not built for the portable baseline"):
        bl.find_or_build(bl.BASELINES["portable"], "0.3.36", native, build=False)
    assert bl.BASELINES["portable"].cpu_needs() == []


def test_unknown_baseline_is_a_usage_error(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    res = cli("kit", "build", "-o", str(tmp_path / "k.tar"), "--baseline", "pentium")
    assert res.exit_code == 2 and "Unknown CPU baseline 'pentium'" in res.stderr
    assert not (tmp_path / "k.tar").exists()
