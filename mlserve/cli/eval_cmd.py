"""``mlserve eval REF|URL --dataset FILE.jsonl``: score a model's notes against reference notes, keep the result."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mlserve.bench.client import list_models
from mlserve.bench.local_server import LocalServer
from mlserve.bench.sysinfo import machine
from mlserve.bench.workload import DEFAULT_SYSTEM
from mlserve.bundles.store import Bundle, Store
from mlserve.cli.app import app
from mlserve.cli.console import emit_json, err, info
from mlserve.errors import CheckFailed, NotFoundError, UsageError
from mlserve.eval import results, runner
from mlserve.eval.dataset import read_pairs

_URL = re.compile(r"https?://", re.IGNORECASE)
TASK = "discharge-summary"
DEFAULT_MAX_TOKENS = 512
EVAL_CTX = 8192
# (column, key, scale): ROUGE and coverage as percentages, as the ACI-Bench paper prints them.
COLUMNS = (
    ("ROUGE-1", "rouge1", 100),
    ("ROUGE-2", "rouge2", 100),
    ("ROUGE-L", "rougeL", 100),
    ("ROUGE-Lsum", "rougeLsum", 100),
    ("sections %", "section_coverage", 100),
    ("length ratio", "length_ratio", 1),
    ("copied %", "transcript_overlap", 100),
)


def _task(bundle: Bundle | None, task: str | None) -> tuple[str, str, int | None]:
    """The task's name, system prompt and max_tokens from the bundle's recipe (the bench's prompt if none)."""
    prompts: dict[str, Any] = bundle.manifest.get("serving", {}).get("prompts", {}) if bundle else {}
    if task is not None and task not in prompts:
        known = ", ".join(sorted(prompts)) or "none"
        raise UsageError(f"The bundle has no task {task!r} (its tasks: {known}).", "Give --task NAME from its recipe.")
    name = task or (TASK if TASK in prompts else None)
    if name is None:
        return "default", DEFAULT_SYSTEM, None
    chosen = prompts[name]
    return name, str(chosen["system"]), chosen.get("max_tokens")


def _served(url: str, model: str | None, api_key: str | None) -> dict[str, Any]:
    """The server's /v1/models entry to evaluate: --model, else its only (or first) model."""
    models = asyncio.run(list_models(url, api_key))
    if model is not None:
        entry = next((m for m in models if m["id"] == model), None)
        if entry is None:
            raise NotFoundError(f"{url} does not serve {model!r}.", "See its /v1/models for the ids it serves.")
        return entry
    if not models:
        raise UsageError(f"{url}/v1/models lists no models.", "Pass --model NAME.")
    return models[0]


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[runner.Answer], None]]:
    if not enabled or not err.is_terminal:
        yield lambda answer: None
        return
    columns = (
        TextColumn("eval"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[failed]} failed"),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("eval", total=total, failed=0)
        failed = 0

        def done(answer: runner.Answer) -> None:
            nonlocal failed
            failed += answer.text is None
            progress.update(task, advance=1, failed=failed)

        yield done


def table(doc: dict[str, Any]) -> Table:
    """Scores and latency of one eval, as the terminal shows them."""
    title = f"{doc['model']} on {doc['dataset']['file']} ({doc['completed']} of {len(doc['items'])} notes)"
    t = Table(title=title, box=None, title_justify="left")
    for column, _, _ in COLUMNS:
        t.add_column(column, justify="right")
    for column in ("p50 e2e s", "p99 e2e s", "tok/s"):
        t.add_column(column, justify="right")
    s, lat = doc["scores"], doc["latency"]
    cells = [f"{s[key] * scale:.1f}" if scale != 1 else f"{s[key]:.2f}" for _, key, scale in COLUMNS]
    cells += [f"{lat[k] / 1000:.1f}" for k in ("median_e2el_ms", "p99_e2el_ms")] + [f"{lat['output_throughput']:.1f}"]
    t.add_row(*cells)
    return t


@app.command("eval")
def eval_(
    target: str = typer.Argument(..., help="A REF (served on a free loopback port for the run) or a server URL."),
    dataset: Path = typer.Option(..., "--dataset", help="JSONL of {'id', 'dialogue', 'note'} rows."),
    task: Optional[str] = typer.Option(None, "--task", help="The recipe's task prompt (default: discharge-summary)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Score only the first N rows."),
    split: Optional[str] = typer.Option(
        None, "--split", help="Score only the rows whose id starts with SPLIT/ (e.g. valid), before --limit."
    ),
    concurrency: int = typer.Option(1, "--concurrency", "-c", min=1, help="Requests in flight at once."),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", min=1, help=f"Output budget per note (default: the task's, else {DEFAULT_MAX_TOKENS})."
    ),
    batched: bool = typer.Option(
        False,
        "--batched",
        help="Let the server batch the requests (faster, but scores then vary with load); "
        "by default each is decoded alone, so the same bundle always scores the same.",
    ),
    model: Optional[str] = typer.Option(None, "--model", help="URL target: the model id to send."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MLSERVE_API_KEY", help="Bearer key."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="REF target: serve --threads."),
    ctx_size: Optional[int] = typer.Option(
        None, "--ctx-size", min=16, help=f"REF target: serve --ctx-size (default: the bundle's, at least {EVAL_CTX})."
    ),
    timeout: float = typer.Option(900.0, "--timeout", min=1, help="Per-request timeout, seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the eval document on stdout (nothing else there)."),
) -> None:
    """Score a model's clinical notes against reference notes: ROUGE-1/2/L F1, section coverage, latency.

    Greedy requests, one per dialogue, with the recipe's task prompt; the result is stored with
    the bundle digest and the dataset's sha256 under $MLSERVE_HOME/evals/NAME/VERSION/, where
    `show`, `history` and `promote --require-eval latest` find it. Exit 1 when no request completed.
    """
    pairs = read_pairs(dataset, limit, split)
    store = Store()
    env: dict[str, Any] = machine()

    def evaluate(url: str, subject: results.Subject, chosen: tuple[str, str, int | None]) -> dict[str, Any]:
        task_name, system, task_tokens = chosen
        plan = runner.Plan(
            base_url=url,
            model=subject.model,
            system=system,
            max_tokens=max_tokens or task_tokens or DEFAULT_MAX_TOKENS,
            concurrency=concurrency,
            deterministic=not batched,
            timeout=timeout,
            api_key=api_key,
        )
        with _progress(len(pairs.pairs), not as_json) as done:
            answers, duration = runner.run(plan, pairs.pairs, done)
        run_env = {**env, "server": url, "bundle_digest": subject.digest}
        return results.build(subject, pairs, task_name, plan, answers, duration, run_env)

    if _URL.match(target):
        url = target.rstrip("/")
        entry = _served(url, model, api_key)
        digest = entry.get("digest")
        name = str(entry["id"]).partition("@")[0].partition(":")[0]
        subject = results.Subject(target, str(entry["id"]), name, entry.get("version"), digest)
        doc = evaluate(url, subject, _task(_stored(store, digest), task))
    else:
        bundle = store.resolve(target)
        subject = results.Subject(target, bundle.ref, bundle.name, bundle.version, bundle.digest)
        chosen = _task(bundle, task)  # before the server starts: a wrong --task costs nothing
        info(f"starting `mlserve serve {bundle.ref}` on a free loopback port")
        # The server's own deadline is the eval's: a long note on a busy machine is slow, not failed.
        # It holds only the sequences the eval sends at once, each long enough for a whole dialogue.
        flags = ["--request-timeout", str(timeout), "--parallel", str(concurrency)]
        flags += ["--ctx-size", str(ctx_size or _eval_ctx(bundle))] + (["--threads", str(threads)] if threads else [])
        with LocalServer(bundle.ref, flags) as server:
            doc = evaluate(server.url, subject, chosen)
    saved = results.save(store, doc) if doc["completed"] else None
    if as_json:
        emit_json({**doc, "file": str(saved) if saved else None})
    else:
        _print(table(doc))
    if saved is not None:
        info(f"stored {saved}")
    elif doc["completed"]:
        info("not stored: the server did not name the bundle's version and digest")
    if not doc["completed"]:
        raise CheckFailed(f"No request of the eval completed: {'; '.join(doc['errors'])}", "Check the server's log.")
    if doc["failed"]:
        info(f"warning: {doc['failed']} request(s) failed: {'; '.join(doc['errors'])}")


def _eval_ctx(bundle: Bundle) -> int:
    """Context per sequence: the bundle's, at least EVAL_CTX (the longest ACI-Bench dialogue and its note fit)."""
    return max(int(bundle.manifest.get("serving", {}).get("defaults", {}).get("ctx_size", 4096)), EVAL_CTX)


def _print(renderable: Any) -> None:
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)
    console.print(renderable)


def _stored(store: Store, digest: Any) -> Bundle | None:
    """The stored bundle with this manifest digest (for its task prompts), if this store holds it."""
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        return None
    try:
        return store.resolve(digest)
    except NotFoundError:
        return None
