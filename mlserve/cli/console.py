"""Terminal rendering: JSON to stdout, tables, progress and errors to stderr."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mlserve.errors import MlserveError

err = Console(stderr=True, highlight=False)


def debug_enabled() -> bool:
    """Whether tracebacks are wanted (``--debug`` or ``MLSERVE_DEBUG=1``)."""
    return os.environ.get("MLSERVE_DEBUG", "") not in ("", "0")


def emit_json(data: Any) -> None:
    """The one JSON document a ``--json`` command prints on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def render_error(exc: MlserveError) -> None:
    """One or two plain sentences on stderr."""
    # Messages hold paths and patterns like [0-9a-f]; they must never be read as markup.
    err.print(f"[bold red]error:[/] {escape(exc.message)}", markup=True, soft_wrap=True)
    if exc.hint:
        err.print(f"hint: {exc.hint}", markup=False, soft_wrap=True)


def info(message: str) -> None:
    """A status line on stderr."""
    err.print(message, markup=False, soft_wrap=True)


@contextmanager
def byte_progress(label: str, total: int | None, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A byte progress bar with size, speed and ETA on a terminal; nothing otherwise."""
    if not enabled or not err.is_terminal:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def human_size(n: int) -> str:
    """Bytes as a short human string."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"
