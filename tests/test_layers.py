"""Imports only point down: cli > server > engine > core; one module owns each third-party library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlserve"

UI = {"typer", "rich", "mlserve.cli"}
HTTP = {"starlette", "uvicorn", "mlserve.server"}
# layer -> modules it must never import (a name matches itself and everything below it).
FORBIDDEN = {
    "core": UI | HTTP | {"mlserve.engine"},
    "engine": UI | HTTP,
    "server": UI,
    "cli": set(),
}


def layer_of(rel: Path) -> str:
    """The layer of a module, from its path relative to the package root."""
    if rel.parts[0] in ("cli", "server", "engine"):
        return rel.parts[0]
    if rel.as_posix() == "__main__.py":  # ``python -m mlserve`` is the CLI's entry point
        return "cli"
    return "core"  # top-level modules and bench/


def module_name(rel: Path) -> str:
    parts = ["mlserve", *rel.with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package_root: Path) -> list[tuple[int, str]]:
    """Every module a file imports (top level, in functions, under TYPE_CHECKING), relative ones resolved."""
    rel = path.relative_to(package_root)
    package = module_name(rel).split(".")
    if rel.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
                # ``from . import x`` may import a submodule x
                found.extend((node.lineno, f"{target}.{a.name}") for a in node.names if not node.module)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return found


def _matches(name: str, banned: str) -> bool:
    return name == banned or name.startswith(banned + ".")


def violations(package_root: Path) -> list[str]:
    """Every import that reaches up a layer or uses a library outside its owning module."""
    problems: list[str] = []
    for path in sorted(package_root.rglob("*.py")):
        rel = path.relative_to(package_root)
        layer = layer_of(rel)
        for line, name in imports_of(path, package_root):
            where = f"mlserve/{rel.as_posix()}:{line} imports {name}"
            problems += [f"{where} ({layer} must not import {b})" for b in FORBIDDEN[layer] if _matches(name, b)]
            if _matches(name, "llama_cpp") and not (layer == "engine" and rel.name.startswith("llama")):
                problems.append(f"{where} (only mlserve/engine/llama*.py may import llama_cpp)")
            if _matches(name, "huggingface_hub") and rel.as_posix() != "hub.py":
                problems.append(f"{where} (only mlserve/hub.py may import huggingface_hub)")
    return problems


def test_no_layer_reaches_up() -> None:
    assert list(PACKAGE.rglob("*.py")), "found no modules to check"
    assert violations(PACKAGE) == []


def test_core_modules_are_checked() -> None:
    core = [p for p in PACKAGE.rglob("*.py") if layer_of(p.relative_to(PACKAGE)) == "core"]
    assert {"store.py", "gguf_info.py", "recipes.py"} <= {p.name for p in core}


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "mlserve"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("rel", "source", "expected"),
    [
        ("store.py", "import typer\n", "core must not import typer"),
        ("store.py", "def f():\n    from rich.console import Console\n", "core must not import rich"),
        ("bench/run.py", "from mlserve.server.app import create_app\n", "core must not import mlserve.server"),
        ("bench/run.py", "from ..cli import app\n", "core must not import mlserve.cli"),
        ("recipes.py", "from . import engine\n", "core must not import mlserve.engine"),
        ("hub.py", "import uvicorn\n", "core must not import uvicorn"),
        ("server/app.py", "from mlserve.cli.console import err\n", "server must not import mlserve.cli"),
        ("server/app.py", "import rich\n", "server must not import rich"),
        ("engine/scheduler.py", "from starlette.requests import Request\n", "engine must not import starlette"),
        ("engine/scheduler.py", "from ..server import app\n", "engine must not import mlserve.server"),
        ("engine/scheduler.py", "import llama_cpp\n", "only mlserve/engine/llama*.py may import llama_cpp"),
        ("server/app.py", "from llama_cpp import Llama\n", "only mlserve/engine/llama*.py may import llama_cpp"),
        ("pull.py", "from huggingface_hub import hf_hub_download\n", "only mlserve/hub.py may import huggingface_hub"),
    ],
)
def test_checker_catches_violation(tmp_path: Path, rel: str, source: str, expected: str) -> None:
    root = _tree(tmp_path, {"__init__.py": "", rel: source})
    found = violations(root)
    assert len(found) == 1 and expected in found[0], found


def test_checker_allows_downward_imports(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "__main__.py": "from mlserve.cli import main\n",
            "hub.py": "import huggingface_hub\n",
            "engine/llama_model.py": "import llama_cpp\nfrom mlserve.store import Store\n",
            "server/app.py": "import starlette\nfrom mlserve.engine.base import Engine\nfrom .state import S\n",
            "cli/serve.py": "import typer\nimport rich\nfrom mlserve.server.app import create_app\n",
        },
    )
    assert violations(root) == []
