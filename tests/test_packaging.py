"""What the package declares: every third-party module it imports comes from a declared dependency."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _top_level_imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in one file (relative imports are the package's own)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # An optional extra (`mlserve[ray]`) declares what its one module imports; the test extra declares nothing.
    extras = [dep for name, deps in project["optional-dependencies"].items() if name != "test" for dep in deps]
    declared = {_canonical(re.split(r"[\s\[<>=!~;]", dep, maxsplit=1)[0]) for dep in project["dependencies"] + extras}
    providers = importlib.metadata.packages_distributions()
    undeclared: dict[str, list[str]] = {}
    for path in sorted((ROOT / "mlserve").rglob("*.py")):
        for module in _top_level_imports(path):
            if module in sys.stdlib_module_names or module in ("mlserve", "__future__"):
                continue
            dists = {_canonical(d) for d in providers.get(module, [module])}
            if not dists & declared:
                undeclared.setdefault(f"{module} ({', '.join(sorted(dists))})", []).append(str(path.relative_to(ROOT)))
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
