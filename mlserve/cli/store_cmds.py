"""Store commands: pack, list, show, verify, rm, export, import."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from mlserve.bundles.channels import release
from mlserve.bundles.packing import pack_file
from mlserve.bundles.store import Bundle, Store
from mlserve.bundles.transfer import export_bundle, import_archive
from mlserve.cli.app import app
from mlserve.cli.console import byte_progress, emit_json, human_size, info
from mlserve.errors import CheckFailed, ConflictError, UsageError
from mlserve.sources.recipes import load_recipe

JSON = typer.Option(False, "--json", help="Print one JSON document on stdout.")


def _summary(bundle: Bundle, store: Store) -> dict[str, Any]:
    return {**bundle.describe(), "channels": store.channels_of(bundle)}


def _latest_eval(bundle: Bundle, store: Store) -> dict[str, Any] | None:
    from mlserve.eval import results

    found = results.latest(store, bundle.name, bundle.version, lambda d: d.get("digest") == bundle.digest)
    return results.summary(*found) if found is not None else None


def _print_table(table: Table) -> None:
    """A table on stdout; piped, at its natural width so scripts never see cropped digests."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=4096)
    console.print(table)


def report_bundle(bundle: Bundle, created: bool, store: Store, as_json: bool, verb: str) -> None:
    """Print what pack, pull and import produced."""
    if as_json:
        emit_json({**_summary(bundle, store), "created": created})
        return
    state = verb if created else "already stored as"
    info(f"{state} {bundle.ref} ({bundle.digest[:19]})")


@app.command()
def pack(
    file: Path = typer.Argument(..., help="The GGUF model file."),
    name: str = typer.Option(..., "--name", help="Bundle name, e.g. gemma3-270m."),
    version: Optional[str] = typer.Option(None, "--version", help="Version; default is the next number."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Recipe YAML with the pin and serving defaults."),
    as_json: bool = JSON,
) -> None:
    """Validate a GGUF file and store it as an immutable bundle version."""
    store = Store()
    rec = load_recipe(recipe) if recipe else None
    size = file.stat().st_size if file.is_file() else None
    with byte_progress(f"packing {file.name}", size, not as_json) as progress:
        bundle, created = pack_file(store, file, name, version, rec, progress=progress)
    report_bundle(bundle, created, store, as_json, "packed")
    serving = bundle.manifest.get("serving", {})
    if not bundle.manifest["gguf"].get("chat_template_sha256") and not serving.get("chat_template"):
        info(
            f"note: {bundle.ref} has no chat template, so /v1/chat/completions will refuse it; "
            "pack it with a --recipe that carries one to serve chat."
        )


@app.command("list")
def list_(as_json: bool = JSON) -> None:
    """List stored bundles."""
    store = Store()
    bundles = store.bundles()
    if as_json:
        emit_json([_summary(b, store) for b in bundles])
        return
    table = Table(box=None)
    for column in ("NAME", "VERSION", "DIGEST", "SIZE"):
        table.add_column(column, no_wrap=True)  # the fields a user copies must never be cut
    for column in ("ARCH", "QUANT", "CHANNELS", "CREATED"):
        table.add_column(column)
    for b in bundles:
        m = b.manifest
        size = sum(int(f["size"]) for f in m["files"])
        table.add_row(
            b.name,
            b.version,
            b.digest[:19],
            human_size(size),
            m["gguf"]["architecture"],
            str(m["gguf"].get("file_type") or "-"),
            ",".join(store.channels_of(b)) or "-",
            m["created_at"],
        )
    if not bundles:
        info(f"No bundles in {store.root}. Add one with `mlserve pull gemma3-270m`.")
        return
    _print_table(table)


@app.command()
def show(
    ref: str = typer.Argument(..., help="NAME, NAME:VERSION, NAME@CHANNEL or sha256:HEX."), as_json: bool = JSON
) -> None:
    """Show one bundle's manifest, channels and GGUF facts."""
    store = Store()
    bundle = store.resolve(ref)
    summary = {**_summary(bundle, store), "eval": _latest_eval(bundle, store)}
    if as_json:
        emit_json(summary)
        return
    m = bundle.manifest
    g = m["gguf"]
    rows = [
        ("ref", bundle.ref),
        ("digest", bundle.digest),
        ("created", m["created_at"]),
        ("channels", ", ".join(summary["channels"]) or "-"),
        ("architecture", g["architecture"]),
        ("parameters", f"{g['parameter_count']:,}"),
        ("quantization", str(g.get("file_type"))),
        ("context length", str(g.get("context_length"))),
        ("vocabulary", str(g.get("vocab_size"))),
        ("chat template", str(g.get("chat_template_sha256") or "none in GGUF")),
        ("recipe", str(m["serving"].get("recipe"))),
        ("source", str(m["provenance"].get("source"))),
    ]
    for f in m["files"]:
        rows.append((f"file {f['name']}", f"{human_size(f['size'])} sha256:{f['sha256']}"))
    ev = summary["eval"]
    if ev is not None:
        s = ev["scores"]
        scores = " ".join(f"{k} {s[k]:.3f}" for k in ("rouge1", "rouge2", "rougeL") if k in s)
        rows.append(("latest eval", f"{scores} sections {s.get('section_coverage', 0):.2f} ({ev['file']})"))
    table = Table(show_header=False, box=None)
    for k, v in rows:
        table.add_row(k, v)
    _print_table(table)


@app.command()
def verify(
    ref: Optional[str] = typer.Argument(None, help="One bundle; all bundles when left out."), as_json: bool = JSON
) -> None:
    """Re-hash every blob; exit 1 when any is missing or altered."""
    store = Store()
    bundles = [store.resolve(ref)] if ref else store.bundles()
    results: list[dict[str, Any]] = []
    for b in bundles:
        total = sum(int(f["size"]) for f in b.manifest["files"])
        with byte_progress(f"verifying {b.ref}", total, not as_json) as progress:
            problems = store.verify(b, progress)
        results.append({"ref": b.ref, "digest": b.digest, "ok": not problems, "problems": problems})
    bad = [r for r in results if not r["ok"]]
    if as_json:
        emit_json({"ok": not bad, "bundles": results})
    else:
        for r in results:
            info(
                f"{'ok  ' if r['ok'] else 'FAIL'} {r['ref']}"
                + (f": {'; '.join(r['problems'])}" if r["problems"] else "")
            )
    if bad:
        names = ", ".join(r["ref"] for r in bad)
        raise CheckFailed(
            f"Verification failed for {names}.", "Re-pull or re-import the bundle, then `mlserve verify` again."
        )


@app.command()
def rm(
    ref: str = typer.Argument(..., help="The version to remove."),
    force: bool = typer.Option(
        False, "--force", help="Remove even when a channel points at it (the channel, or its canary, goes too)."
    ),
    as_json: bool = JSON,
) -> None:
    """Remove a bundle version (blobs no other version uses go with it)."""
    store = Store()
    with store.lock():
        bundle = store.resolve(ref)
        channels = store.channels_of(bundle)
        if channels and not force:
            raise ConflictError(
                f"{bundle.ref} is the target of channel(s) {', '.join(channels)}; not removing it.",
                "Promote another version first, or pass --force.",
            )
        for channel in channels:
            release(store, bundle, channel)
        store.remove_manifest(bundle)
    if as_json:
        emit_json({"removed": bundle.ref, "digest": bundle.digest, "channels_removed": channels})
    else:
        info(f"removed {bundle.ref}")


@app.command("export")
def export_(
    ref: str = typer.Argument(..., help="The bundle to export."),
    output: Path = typer.Option(..., "-o", "--output", help="The tar file to write."),
    as_json: bool = JSON,
) -> None:
    """Write a bundle as one tar file for air-gapped transfer."""
    if output.is_dir():
        raise UsageError(f"{output} is a directory.", "Give the path of the tar file to write, e.g. -o model.tar.")
    store = Store()
    bundle = store.resolve(ref)
    size = export_bundle(store, bundle, output)
    if as_json:
        emit_json({"exported": bundle.ref, "digest": bundle.digest, "file": str(output), "size": size})
    else:
        info(f"exported {bundle.ref} to {output} ({human_size(size)})")


@app.command("import")
def import_(
    archive: Path = typer.Argument(..., help="A tar written by `mlserve export`."), as_json: bool = JSON
) -> None:
    """Import an exported bundle, verifying every hash; nothing is added when a check fails."""
    store = Store()
    bundle, created = import_archive(store, archive)
    report_bundle(bundle, created, store, as_json, "imported")
