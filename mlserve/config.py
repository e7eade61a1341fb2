"""Where mlserve keeps its state, and the environment it reads."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The store root: ``$MLSERVE_HOME``, else ``~/.mlserve``."""
    env = os.environ.get("MLSERVE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".mlserve"


def current_user() -> str:
    """The login name recorded in history and audit entries."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers) and no LOGNAME/USER
        return f"uid-{os.getuid()}"


def env_value(name: str, default: str | None = None) -> str | None:
    """Read ``MLSERVE_<NAME>`` from the environment."""
    return os.environ.get(f"MLSERVE_{name.upper()}", default)


def recipes_dir() -> Path:
    """The directory of bundled recipes: ``$MLSERVE_RECIPES``, the wheel's ``mlserve/recipes``, or the checkout's.

    A wheel carries the top-level ``recipes/`` as ``mlserve/recipes`` (copied by setup.py at
    build time); an editable install has no copy and reads ``recipes/`` in the checkout.
    """
    override = env_value("RECIPES")
    if override:
        return Path(override)
    packaged = Path(__file__).parent / "recipes"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "recipes"
