"""``mlserve keys create|list|revoke``: API keys; the secret is shown once, only its hash is kept."""

from __future__ import annotations

from typing import Optional

import typer

from mlserve.cli.app import app
from mlserve.cli.console import emit_json, info
from mlserve.config import current_user
from mlserve.security import audit
from mlserve.security.keys import KeyStore

JSON = typer.Option(False, "--json", help="Print one JSON document on stdout.")
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command()
def create(
    name: str = typer.Argument(..., help="A name for the key (who or what uses it)."),
    scope: Optional[list[str]] = typer.Option(
        None, "--scope", help="infer, admin or metrics; repeat for several (default: infer)."
    ),
    as_json: bool = JSON,
) -> None:
    """Create a key and print it once; only its sha256 is stored."""
    record, secret = KeyStore().create(name, scope)
    audit.append({"event": "key.create", "name": record.name, "scopes": list(record.scopes), "actor": current_user()})
    if as_json:
        emit_json({"name": record.name, "key": secret, "scopes": list(record.scopes)})
        return
    info(f"created key {record.name} (scopes: {', '.join(record.scopes)}); it is shown only this once:")
    typer.echo(secret)


@keys_app.command("list")
def list_(as_json: bool = JSON) -> None:
    """List keys (names, scopes, dates; never the keys)."""
    records = [r.public() for r in KeyStore().records()]
    if as_json:
        emit_json({"keys": records})
        return
    if not records:
        info("no keys: the server accepts requests without a key (loopback only)")
    for r in records:
        state = f"revoked {r['revoked_at']}" if r["revoked_at"] else "active"
        typer.echo(f"{r['name']}\t{','.join(r['scopes'])}\tcreated {r['created_at']}\t{state}")


@keys_app.command()
def revoke(name: str = typer.Argument(..., help="The key to revoke."), as_json: bool = JSON) -> None:
    """Revoke a key; running servers refuse it within a second."""
    record = KeyStore().revoke(name)
    audit.append({"event": "key.revoke", "name": record.name, "actor": current_user()})
    if as_json:
        emit_json(record.public())
        return
    info(f"revoked key {record.name}")
