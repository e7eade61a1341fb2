"""Channel commands: promote, rollback, history."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from mlserve.bundles import channels
from mlserve.bundles.store import Bundle, Store
from mlserve.cli.app import app
from mlserve.cli.console import emit_json, info
from mlserve.cli.store_cmds import _print_table
from mlserve.errors import CheckFailed, EngineError, NotFoundError, UsageError

JSON = typer.Option(False, "--json", help="Print one JSON document on stdout.")
REASON = typer.Option(None, "--reason", help="Why; kept in the channel's history.")


def _smoke_gate(store: Store, quiet: bool) -> channels.Gate:
    """Load the bundle with llama.cpp and complete a few tokens; refuse when that fails."""

    def gate(bundle: Bundle) -> None:
        from mlserve.engine.smoke import smoke_bundle

        try:
            result = smoke_bundle(store, bundle)
        except EngineError as exc:
            raise CheckFailed(
                f"Not promoting {bundle.ref}: the smoke check failed. {exc.message}",
                "Run `mlserve doctor` and `mlserve verify`, or promote another version.",
            ) from exc
        if not quiet:
            info(f"smoke check ok: {bundle.ref} generated {result.completion_tokens} tokens in {result.seconds:.1f} s")

    return gate


def _describe(entry: dict[str, Any]) -> str:
    before = entry.get("from")
    src = f"{entry['name']}:{before['version']}" if before else "(none)"
    dst = f"{entry['name']}:{entry['to']['version']}"
    extra = f" ({entry['percent']:g}% canary)" if entry.get("percent") is not None else ""
    return f"{entry['name']}@{entry['channel']}: {src} -> {dst}{extra} [{entry['action']}]"


@app.command()
def promote(
    ref: str = typer.Argument(..., help="The version to promote: NAME:VERSION, NAME@CHANNEL or sha256:HEX."),
    to: str = typer.Option(..., "--to", help="The channel to move, e.g. production, staging, canary."),
    reason: Optional[str] = REASON,
    canary: Optional[float] = typer.Option(
        None, "--canary", help="Send this percentage of the channel's requests to REF; the rest stay where they are."
    ),
    check: bool = typer.Option(False, "--check", help="First verify the blobs and run a short completion."),
    require_bench: Optional[Path] = typer.Option(
        None,
        "--require-bench",
        help="A `mlserve bench --output` file that measured this very bundle (its env.bundle_digest) and meets --slo.",
    ),
    slo: list[str] = typer.Option([], "--slo", help="KEY=MS bound on each result's p99, e.g. ttft_ms=500."),
    require_eval: Optional[str] = typer.Option(
        None,
        "--require-eval",
        help="An `mlserve eval` file that scored this very bundle, or `latest` (its newest stored eval).",
    ),
    minimum: list[str] = typer.Option([], "--min", help="KEY=X lower bound on an eval score, e.g. rougeL=0.20."),
    max_drop: list[str] = typer.Option(
        [], "--max-drop", help="KEY=X: refuse a drop of more than X below the eval of the version the channel holds."
    ),
    eval_dataset: Optional[Path] = typer.Option(
        None, "--eval-dataset", help="The eval must have run on this JSONL file (its sha256)."
    ),
    as_json: bool = JSON,
) -> None:
    """Point a channel at a version (exit 1 and no change when a gate refuses)."""
    from mlserve.bench.metrics import parse_slo
    from mlserve.eval.gate import eval_gate, parse_bounds

    if slo and require_bench is None:
        raise UsageError("--slo needs --require-bench FILE.json to check against.")
    if (minimum or max_drop or eval_dataset) and require_eval is None:
        raise UsageError("--min, --max-drop and --eval-dataset need --require-eval FILE|latest.")
    store = Store()
    gates: list[channels.Gate] = []
    if require_eval is not None:
        bounds, drops = parse_bounds(minimum, "--min"), parse_bounds(max_drop, "--max-drop")
        gates.append(eval_gate(store, require_eval, to, bounds, drops, eval_dataset))
    if require_bench is not None:
        gates.append(channels.bench_gate(require_bench, parse_slo(slo)))
    if check:
        gates += [channels.verify_gate(store), _smoke_gate(store, as_json)]
    entry = channels.promote(store, ref, to, reason, canary, tuple(gates))
    if as_json:
        emit_json(entry)
    else:
        info(_describe(entry))
        gate = entry.get("gates", {}).get("eval")
        if gate:
            keys = list(dict.fromkeys([*gate["min"], *gate["max_drop"]])) or ["rougeL"]
            scores = ", ".join(f"{k} {gate['scores'][k]:.4f}" for k in keys if k in gate["scores"])
            info(f"eval gate passed: {scores} ({gate['file']})")


@app.command()
def rollback(
    name: str = typer.Argument(..., help="The bundle name."),
    channel: str = typer.Option(..., "--channel", help="The channel to move back."),
    reason: Optional[str] = REASON,
    as_json: bool = JSON,
) -> None:
    """Drop the channel's canary, or else point it back at its previous version."""
    entry = channels.rollback(Store(), name, channel, reason)
    if as_json:
        emit_json(entry)
    else:
        info(_describe(entry))


@app.command()
def history(
    name: str = typer.Argument(..., help="The bundle name."),
    channel: Optional[str] = typer.Option(None, "--channel", help="Only this channel."),
    as_json: bool = JSON,
) -> None:
    """Show who moved which channel of NAME, when, from what to what, and why."""
    store = Store()
    entries = channels.history(store, name, channel)
    if not entries and not store.bundles(name):
        raise NotFoundError(f"No bundle named {name!r} in {store.root}.", "Run `mlserve list` to see the names.")
    if as_json:
        emit_json(entries)
        return
    if not entries:
        info(f"No channel of {name} has moved yet.")
        return
    table = Table("TIME", "USER", "CHANNEL", "ACTION", "FROM", "TO", "REASON", box=None)
    for e in entries:
        before = e.get("from")
        to = e["to"]["version"] + (f" ({e['percent']:g}%)" if e.get("percent") is not None else "")
        table.add_row(
            e["time"],
            e["user"],
            e["channel"],
            e["action"],
            before["version"] if before else "-",
            to,
            e.get("reason") or "",
        )
    _print_table(table)
    _latest_evals(store, name, [e["to"]["version"] for e in entries])


def _latest_evals(store: Store, name: str, versions: list[str]) -> None:
    """A line per version the history names: its newest stored eval."""
    from mlserve.eval import results

    for version in dict.fromkeys(reversed(versions)):
        found = results.latest(store, name, version)
        if found is not None:
            info(f"latest eval of {name}:{version}: {results.one_line(found[1])}")
