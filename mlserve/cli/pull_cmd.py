"""The ``pull`` command: fetch a model from the Hub, a recipe or a file, and pack it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Optional

import typer

from mlserve.bundles.store import Store
from mlserve.cli.app import app
from mlserve.cli.console import byte_progress, emit_json, info
from mlserve.sources.pull import pull as run_pull


@app.command()
def pull(
    source: str = typer.Argument(
        ...,
        help="hf://OWNER/REPO/FILE.gguf (optionally @REVISION), a recipe file or name, or a .gguf path.",
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Bundle name; default: the recipe's or the file's name."),
    version: Optional[str] = typer.Option(None, "--version", help="Version; default is the next number."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Fetch a model (Hub, recipe sources in order, or a local file), verify its sha256 and pack it."""

    def progress(label: str, total: int | None) -> AbstractContextManager[Callable[[int], None] | None]:
        return byte_progress(label, total, not as_json)

    store = Store()
    result = run_pull(source, name, version, store, progress, notify=None if as_json else info)
    bundle = result.bundle
    if as_json:
        emit_json(
            {
                **bundle.describe(),
                "channels": store.channels_of(bundle),
                "created": result.created,
                "source": result.source,
                "failed_sources": result.attempts,
            }
        )
        return
    if result.source == "store":
        info(f"already stored as {bundle.ref} ({bundle.digest[:19]}); the recipe's pinned bytes are in the store")
        return
    state = "pulled" if result.created else "already stored as"
    info(f"{state} {bundle.ref} ({bundle.digest[:19]}) from {result.source}")
