"""Build hook: ship the top-level ``recipes/`` inside the wheel as ``mlserve/recipes/``.

Every piece of metadata lives in pyproject.toml; this file only adds the copy, because
setuptools' package discovery cannot map a folder outside ``mlserve/`` into the package.
``recipes/`` stays the one source of the recipes; ``mlserve.config.recipes_dir()`` looks
for the packaged copy first, and an editable install (no copy) finds ``recipes/`` in the
checkout instead. MANIFEST.in puts ``recipes/`` into the sdist, so a wheel built from the
sdist carries them too.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPES = Path(__file__).resolve().parent / "recipes"


class BuildPyWithRecipes(build_py):  # type: ignore[misc]
    """``build_py`` that also copies ``recipes/*.yaml`` to ``mlserve/recipes/`` in the build tree."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the checkout's recipes/ is used in place
        found = sorted(RECIPES.glob("*.yaml"))
        if not found:  # a wheel without recipes cannot `mlserve pull gemma3-270m`: fail the build instead
            raise SystemExit(f"No recipes in {RECIPES}; build from a checkout or an sdist that has recipes/.")
        target = Path(self.build_lib) / "mlserve" / "recipes"
        self.mkpath(str(target))
        for path in found:
            self.copy_file(str(path), str(target / path.name))


setup(cmdclass={"build_py": BuildPyWithRecipes})
