"""The mlserve command line: one module per command group, wired onto one typer app."""

from __future__ import annotations

from mlserve.cli import (
    audit_cmd,  # noqa: F401
    bench_cmd,  # noqa: F401
    channel_cmds,  # noqa: F401
    deploy_cmd,  # noqa: F401
    doctor_cmd,  # noqa: F401
    eval_cmd,  # noqa: F401
    health_cmd,  # noqa: F401
    keys_cmd,  # noqa: F401
    kit_cmd,  # noqa: F401
    pull_cmd,  # noqa: F401
    serve_cmd,  # noqa: F401
    store_cmds,  # noqa: F401  (registers commands)
)
from mlserve.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
