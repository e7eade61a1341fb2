"""``mlserve audit verify [FILE]``: check the audit log's hash chain."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlserve.cli.app import app
from mlserve.cli.console import emit_json, info
from mlserve.errors import CheckFailed, NotFoundError
from mlserve.security import audit

audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command()
def verify(
    file: Optional[Path] = typer.Argument(None, help="One day file; the whole log from its start when left out."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Exit 1 naming the first record that was edited, removed or reordered; 0 when intact."""
    if file is not None and not file.is_file():
        raise NotFoundError(f"No audit file {file}.", f"Audit files are in {audit.audit_dir()}.")
    result = audit.verify(file)
    if as_json:
        emit_json(
            {
                "ok": result.ok,
                "files": result.files,
                "records": result.records,
                "last_hash": result.last_hash if result.ok else None,
                "file": result.file,
                "line": result.line,
                "reason": result.reason,
            }
        )
    if not result.ok:
        raise CheckFailed(
            f"Audit record {result.file}:{result.line} is bad: {result.reason}.",
            "Treat the log as tampered with; keep a copy for investigation.",
        )
    if not as_json:
        info(f"ok: {result.records} record(s) in {len(result.files)} file(s) form an intact chain")
