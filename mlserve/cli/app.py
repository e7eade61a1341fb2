"""The typer application and the one place where errors become exit codes."""

from __future__ import annotations

import os
from typing import Any

import typer
from typer.core import TyperGroup

from mlserve import __version__
from mlserve.cli.console import debug_enabled, render_error
from mlserve.errors import MlserveError


class _Group(TyperGroup):
    """Renders MlserveError as plain sentences and exits with its code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except MlserveError as exc:
            if debug_enabled():
                raise
            render_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # a path the user gave cannot be read or written
            if debug_enabled():
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            render_error(MlserveError(f"{exc.strerror or exc}{where}.", "Check the path and its permissions."))
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Group,
    name="mlserve",
    help="Package, pull, serve and benchmark quantized GGUF models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlserve {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Package, pull, serve and benchmark quantized GGUF models."""
    if debug:
        os.environ["MLSERVE_DEBUG"] = "1"
