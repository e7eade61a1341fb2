"""Imports only point down: cli > serving > server > engine > core; no cycles; the server sees only the engine API;
one module owns each third-party library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlserve"

UI = {"typer", "rich", "mlserve.cli"}
HTTP = {"starlette", "uvicorn", "mlserve.server"}
# serving/: the app inside another framework's replicas (Ray Serve); it builds the server like the CLI does.
SERVING = {"mlserve.serving"}
# layer -> modules it must never import (a name matches itself and everything below it).
FORBIDDEN = {
    "core": UI | HTTP | SERVING | {"mlserve.engine"},
    "engine": UI | HTTP | SERVING,
    "server": UI | SERVING,
    "serving": UI,
    "cli": set(),
}
# third-party library -> the one module (relative to mlserve/) that may import it
OWNERS = {
    "llama_cpp": "engine/llama/model.py",
    "huggingface_hub": "sources/hub.py",
    "ray": "serving/ray_app.py",
    "rouge_score": "eval/scoring.py",
}
# llama_cpp's other owners, beside the generation context (model.py), each too large to fold into it:
# the schema-to-grammar converter and grammar sampling, the mean-pooling embeddings context, and the
# process-wide backend init and device registry (a portable build loads its CPU variants there).
ALSO_OWN = {"llama_cpp": ("engine/llama/grammar.py", "engine/llama/embed_context.py", "engine/llama/backends.py")}
ENGINE_API = "mlserve.engine.api"


def layer_of(rel: Path) -> str:
    """The layer of a module, from its path relative to the package root."""
    if rel.parts[0] in ("cli", "serving", "server", "engine"):
        return rel.parts[0]
    if rel.as_posix() == "__main__.py":  # ``python -m mlserve`` is the CLI's entry point
        return "cli"
    return "core"  # top-level modules and bench/


def module_name(rel: Path) -> str:
    parts = ["mlserve", *rel.with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes under ``if TYPE_CHECKING:`` (imports there never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(path: Path, package_root: Path, runtime_only: bool = False) -> list[tuple[int, str]]:
    """Every module a file imports (top level, in functions, under TYPE_CHECKING unless runtime_only)."""
    rel = path.relative_to(package_root)
    package = module_name(rel).split(".")
    if rel.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str]] = []
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
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
                if runtime_only:  # for the module graph: ``from pkg import mod`` imports pkg.mod
                    found.extend((node.lineno, f"{target}.{a.name}") for a in node.names)
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
            for library, owner in OWNERS.items():
                owned = rel.as_posix() == owner or rel.as_posix() in ALSO_OWN.get(library, ())
                if _matches(name, library) and not owned:
                    problems.append(f"{where} (only mlserve/{owner} may import {library})")
            engine_internal = _matches(name, "mlserve.engine") and name != "mlserve.engine"
            if layer == "server" and engine_internal and not _matches(name, ENGINE_API):
                problems.append(f"{where} (the server imports only mlserve.engine.api)")
    return problems


def module_graph(package_root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports at run time (``if TYPE_CHECKING:`` blocks left out)."""
    names = {module_name(p.relative_to(package_root)) for p in package_root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in package_root.rglob("*.py"):
        rel = path.relative_to(package_root)
        deps = set()
        for _, name in imports_of(path, package_root, runtime_only=True):
            # ``from pkg import mod`` names pkg.mod; ``from mod import func`` names mod.func: keep what exists
            while name and name not in names:
                name = name.rpartition(".")[0]
            if name:
                deps.add(name)
        graph[module_name(rel)] = deps - {module_name(rel)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each a cycle to untangle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_layer_reaches_up() -> None:
    assert list(PACKAGE.rglob("*.py")), "found no modules to check"
    assert violations(PACKAGE) == []


def test_core_modules_are_checked() -> None:
    core = [p for p in PACKAGE.rglob("*.py") if layer_of(p.relative_to(PACKAGE)) == "core"]
    assert {"store.py", "gguf_info.py", "recipes.py", "keys.py", "names.py"} <= {p.name for p in core}


def test_no_import_cycles() -> None:
    graph = module_graph(PACKAGE)
    assert "mlserve.server.app" in graph and graph["mlserve.server.app"], "the graph found no imports"
    assert cycles(graph) == []


def test_cycle_checker_finds_a_cycle(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "server/__init__.py": "",
            "server/app.py": "from mlserve.server import routes\n",
            "server/routes.py": "def f():\n    from mlserve.server.app import create_app\n",
            "server/state.py": "import typing\nif typing.TYPE_CHECKING:\n    from mlserve.server import app\n",
        },
    )
    assert cycles(module_graph(root)) == [["mlserve.server.app", "mlserve.server.routes"]]


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
        ("engine/scheduler.py", "import llama_cpp\n", "only mlserve/engine/llama/model.py may import llama_cpp"),
        ("engine/llama/engine.py", "import llama_cpp\n", "only mlserve/engine/llama/model.py may import llama_cpp"),
        ("server/app.py", "from llama_cpp import Llama\n", "only mlserve/engine/llama/model.py may import llama_cpp"),
        (
            "sources/pull.py",
            "from huggingface_hub import hf_hub_download\n",
            "only mlserve/sources/hub.py may import huggingface_hub",
        ),
        ("server/app.py", "from mlserve.engine.scheduler import StepStats\n", "server imports only mlserve.engine.api"),
        ("server/app.py", "import ray\n", "only mlserve/serving/ray_app.py may import ray"),
        ("serving/asgi.py", "from ray import serve\n", "only mlserve/serving/ray_app.py may import ray"),
        ("serving/ray_app.py", "import typer\n", "serving must not import typer"),
        ("server/app.py", "from mlserve.serving.asgi import build_app\n", "server must not import mlserve.serving"),
        ("server/state.py", "from mlserve.engine.llama import factory\n", "server imports only mlserve.engine.api"),
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
            "sources/hub.py": "import huggingface_hub\n",
            "engine/llama/model.py": "import llama_cpp\nfrom mlserve.bundles.store import Store\n",
            "server/app.py": "import starlette\nfrom mlserve.engine.api import Engine\nfrom .state import S\n",
            "cli/serve.py": "import typer\nimport rich\nfrom mlserve.server.app import create_app\n",
        },
    )
    assert violations(root) == []
