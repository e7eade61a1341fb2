"""``mlserve bench``: load-test a server (OpenAI, Ollama or Anthropic API) or a bundle; ``--offline``: the engine."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mlserve.bench import report
from mlserve.bench.apis import APIS
from mlserve.bench.client import list_models
from mlserve.bench.loadgen import Level
from mlserve.bench.local_server import LocalServer
from mlserve.bench.metrics import RequestResult, is_slo_term, parse_slo
from mlserve.bench.offline import run_offline
from mlserve.bench.runner import Hooks, Plan, levels_from, run
from mlserve.bench.sysinfo import machine
from mlserve.bench.workload import Workload, dataset, synthetic
from mlserve.bundles.store import Bundle, Store
from mlserve.cli.app import app
from mlserve.cli.console import emit_json, err, info
from mlserve.errors import CheckFailed, UsageError

_URL = re.compile(r"https?://", re.IGNORECASE)
TASK = "discharge-summary"

SLO_HELP = (
    "Service-level objective, KEY=MS with KEY one of ttft_ms, tpot_ms, itl_ms, e2el_ms; repeat it, or list several "
    "after one --slo (--slo ttft_ms=500 e2el_ms=20000). A request is good when it completed and meets every bound "
    "(itl_ms: its largest gap); request_goodput = good requests/s. The SLO is missed, and bench exits 1, when any "
    "level has a failed request or a p99 above its bound."
)


class BenchApi(str, Enum):
    """The protocol bench drives (each surface's streaming endpoint)."""

    openai = "openai"
    ollama = "ollama"
    anthropic = "anthropic"


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, e.g. 1,4,8; got {text!r}.") from None
    if any(v < 1 for v in values):
        raise UsageError(f"{flag} values must be at least 1.")
    return values


def _floats(text: str | None, flag: str) -> list[float]:
    if not text:
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers, e.g. 2,4; got {text!r}.") from None
    if any(v <= 0 for v in values):
        raise UsageError(f"{flag} values must be above 0.")
    return values


def _split_args(args: list[str], slo: list[str]) -> tuple[str, dict[str, float]]:
    """TARGET and the SLO terms that followed ``--slo`` as extra words."""
    targets = [a for a in args if not is_slo_term(a)]
    if len(targets) != 1:
        raise UsageError(
            f"Give exactly one TARGET (a URL or a REF); got {len(targets)}: {' '.join(targets) or 'none'}.",
            "Example: mlserve bench http://127.0.0.1:8000 --concurrency 1,4",
        )
    return targets[0], parse_slo([*slo, *(a for a in args if is_slo_term(a))])


def _print(renderable: Any) -> None:
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)
    console.print(renderable)


def _level_table(result: dict[str, Any]) -> Table:
    table = Table(title=report.title(result), box=None, show_header=False, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, key in report.ROWS:
        table.add_row(label, report.fmt(result[key]))
    return table


@contextmanager
def _progress(enabled: bool) -> Iterator[Hooks]:
    """A live progress bar per level on a terminal's stderr; silent hooks otherwise."""
    if not enabled or not err.is_terminal:
        yield Hooks()
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[failed]} failed"),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        state: dict[str, Any] = {"task": None, "failed": 0}

        def start(level: Level, n: int) -> None:
            state["failed"] = 0
            state["task"] = progress.add_task(level.label, total=n, failed=0)

        def result(r: RequestResult) -> None:
            if not r.ok:
                state["failed"] += 1
            progress.update(state["task"], advance=1, failed=state["failed"])

        yield Hooks(level_start=start, result=result)


def _ref_env(bundle: Bundle, threads: Optional[int], gpu_layers: Optional[int]) -> dict[str, Any]:
    from mlserve.engine.llama.factory import Overrides, build_info, default_threads, engine_config

    build = build_info()
    config = engine_config(Store(), bundle, Overrides(threads=threads, gpu_layers=gpu_layers))
    return {
        "server": "local",
        "threads": config.threads or default_threads(),
        "llama_cpp": f"llama-cpp-python {build.version}; {build.system_info}",
        "gpu_offload": build.gpu_offload,
        "gpu_layers": config.gpu_layers,
        "device": _device(),
    }


def _device() -> dict[str, Any]:
    """What ran the model: backend, GPUs, and the CPU features the build needs beside those the host has."""
    from mlserve.bench.sysinfo import cpu_features
    from mlserve.engine.llama.hardware import facts, needed_features

    found = facts()
    gpus = [f"{d['name']} ({d['description']}, {d['total']} bytes)" for d in found.gpus()]
    return {
        "backend": found.backend,
        "gpus": gpus,
        "cpu_dispatch": found.dispatch,
        "cpu_needs": needed_features(found),
        "cpu_has": [k for k, v in cpu_features().items() if v],
    }


def _workload(model: str, opts: dict[str, Any], bundle: Bundle | None) -> Workload:
    if opts["dataset"] is None:
        return synthetic(
            model,
            opts["num_prompts"],
            opts["input_len"],
            opts["output_len"],
            opts["seed"],
            opts["temperature"],
            opts["api"],
        )
    prompts = bundle.manifest.get("serving", {}).get("prompts", {}) if bundle else {}
    task = opts["task"]
    if task is not None and task not in prompts:
        known = ", ".join(sorted(prompts)) or "none"
        where = f"{bundle.ref}'s recipe has" if bundle else "a URL target has no recipe, so there are"
        raise UsageError(f"--task {task}: {where} no such task prompt (tasks: {known}).", "Give a REF target.")
    system = (prompts.get(task or TASK) or {}).get("system")
    return dataset(
        model,
        opts["dataset"],
        opts["num_prompts"],
        opts["output_len"],
        system,
        opts["temperature"],
        opts["api"],
        levels=len(opts["levels"]),
    )


def _bench_url(url: str, bundle: Bundle | None, env: dict[str, Any], opts: dict[str, Any]) -> dict[str, Any]:
    models = asyncio.run(list_models(url, opts["api_key"], api=APIS[opts["api"]]))
    model = opts["model"] or (bundle.ref if bundle else None) or (models[0]["id"] if models else None)
    if not model:
        raise UsageError(f"{url}/v1/models lists no models.", "Pass --model NAME.")
    entry = next((m for m in models if m["id"] == model), {})
    env["bundle_digest"] = entry.get("digest") or (bundle.digest if bundle else None)
    workload = _workload(model, opts, bundle)
    env["workload"] = workload.description
    plan = Plan(
        base_url=url,
        workload=workload,
        levels=opts["levels"],
        warmup=opts["warmup"],
        burstiness=opts["burstiness"],
        seed=opts["seed"],
        slo=opts["slo"],
        timeout=opts["timeout"],
        api_key=opts["api_key"],
        api=opts["api"],
    )
    with _progress(True) as hooks:
        results = run(plan, hooks)
    return report.document(opts["target"], model, env, results)


def _serve_args(
    parallel: Optional[int], ctx_size: Optional[int], threads: Optional[int], gpu: Optional[int]
) -> list[str]:
    args: list[str] = []
    for flag, value in (("--parallel", parallel), ("--ctx-size", ctx_size), ("--threads", threads)):
        if value is not None:
            args += [flag, str(value)]
    if gpu is not None:
        args += ["--gpu-layers", str(gpu)]
    return args


def _emit(doc: dict[str, Any], as_json: bool, output: Optional[Path], tables: list[Any]) -> None:
    if output is not None:
        output.write_text(json.dumps(doc, indent=2) + "\n")
    if as_json:
        emit_json(doc)
    else:
        for table in tables:
            _print(table)
    if output is not None:
        info(f"wrote {output}")


@app.command()
def bench(
    args: list[str] = typer.Argument(..., metavar="TARGET", help="A server URL, or a REF to serve for the run."),
    concurrency: Optional[str] = typer.Option(
        None, "--concurrency", "-c", help="Closed-loop levels, run in turn: 1,4,8 (default 1; with a rate: no cap)."
    ),
    request_rate: Optional[str] = typer.Option(
        None, "--request-rate", help="Open loop: requests/s (comma list); --concurrency then caps requests in flight."
    ),
    burstiness: float = typer.Option(1.0, "--burstiness", min=0.01, help="Gamma shape of arrivals (1 = Poisson)."),
    num_prompts: int = typer.Option(32, "--num-prompts", "-n", min=1, help="Requests per level."),
    input_len: int = typer.Option(256, "--input-len", min=1, help="Synthetic prompt length, about N tokens."),
    output_len: int = typer.Option(64, "--output-len", min=1, help="max_tokens of each request."),
    dataset_file: Optional[Path] = typer.Option(
        None, "--dataset", help="JSONL with 'dialogue', 'prompt' or 'messages' per line (sent as chat)."
    ),
    task: Optional[str] = typer.Option(
        None,
        "--task",
        help="With --dataset and a REF: the recipe's task prompt to send with each dialogue (default: "
        "discharge-summary when the recipe has it). Each level gets its own rows while the dataset lasts.",
    ),
    model: Optional[str] = typer.Option(None, "--model", help="Model id to send (default: first of /v1/models)."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Requests sent first and not counted."),
    slo: list[str] = typer.Option([], "--slo", help=SLO_HELP),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the JSON report to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report on stdout (nothing else there)."),
    seed: int = typer.Option(0, "--seed", help="Seed for prompts and arrivals."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0, help="Sent when given."),
    timeout: float = typer.Option(600.0, "--timeout", min=1, help="Per-request timeout, seconds."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="MLSERVE_API_KEY", help="API key (Bearer; x-api-key with --api anthropic)."
    ),
    api: BenchApi = typer.Option(
        BenchApi.openai,
        "--api",
        case_sensitive=False,
        help="Protocol to drive: openai (SSE), ollama (/api/chat, /api/generate; NDJSON), anthropic (/v1/messages).",
    ),
    parallel: Optional[int] = typer.Option(None, "--parallel", min=1, help="REF target: serve --parallel."),
    ctx_size: Optional[int] = typer.Option(None, "--ctx-size", min=16, help="REF target: serve --ctx-size."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="REF target: serve/offline threads."),
    gpu_layers: Optional[int] = typer.Option(None, "--gpu-layers", min=-1, help="REF target: layers on the GPU."),
    offline: bool = typer.Option(False, "--offline", help="Bench the engine directly (pp/tg tokens/s), no HTTP."),
    repetitions: int = typer.Option(3, "--repetitions", "-r", min=1, help="Offline: repetitions of each test."),
    n_prompt: int = typer.Option(128, "--pp", min=0, help="Offline: prompt-processing test size (0 skips)."),
    n_gen: int = typer.Option(64, "--tg", min=0, help="Offline: generation test size (0 skips)."),
) -> None:
    """Load-test a server (TARGET is a URL) or a bundle (TARGET is a REF, served on a free loopback port).

    Streams every request and reports vLLM's metrics per level: TTFT, TPOT, ITL, E2EL
    (mean, median, p99), throughput and goodput; a table per level, or --json / --output.
    Exit 0 on success, 1 when an --slo is missed or a level completes no request.
    """
    target, slo_map = _split_args(args, slo)
    is_url = bool(_URL.match(target))
    if offline:
        if api is not BenchApi.openai:
            raise UsageError("--api chooses the HTTP protocol; --offline benches the engine without HTTP.")
        if is_url:
            raise UsageError("--offline benches a stored bundle's engine, not a URL.", "Give a REF, e.g. gemma3-270m.")
        doc = _offline(Store().resolve(target), threads, gpu_layers, (n_prompt, n_gen, repetitions, seed))
        _emit(doc, as_json, output, [_offline_table(doc)])
        return
    levels = levels_from(_ints(concurrency or "", "--concurrency"), _floats(request_rate, "--request-rate"))
    if task is not None and dataset_file is None:
        raise UsageError("--task picks the prompt sent with each dataset row; give --dataset FILE.jsonl too.")
    opts: dict[str, Any] = {
        "target": target,
        "levels": levels,
        "num_prompts": num_prompts,
        "input_len": input_len,
        "output_len": output_len,
        "dataset": dataset_file,
        "task": task,
        "model": model,
        "warmup": warmup,
        "slo": slo_map,
        "seed": seed,
        "temperature": temperature,
        "timeout": timeout,
        "api_key": api_key,
        "burstiness": burstiness,
        "api": api.value,
    }
    env: dict[str, Any] = {**machine(), "api": api.value}
    if is_url:
        env.update({"server": "remote", "threads": None, "llama_cpp": None, "gpu_offload": None, "device": None})
        doc = _bench_url(target.rstrip("/"), None, env, opts)
    else:
        bundle = Store().resolve(target)
        env.update(_ref_env(bundle, threads, gpu_layers))
        info(f"starting `mlserve serve {bundle.ref}` on a free loopback port")
        with LocalServer(bundle.ref, _serve_args(parallel, ctx_size, threads, gpu_layers)) as server:
            doc = _bench_url(server.url, bundle, env, opts)
    _emit(doc, as_json, output, [_level_table(r) for r in doc["results"]])
    _verdict(doc["results"], slo_map)


def _offline(
    bundle: Bundle, threads: Optional[int], gpu_layers: Optional[int], test: tuple[int, ...]
) -> dict[str, Any]:
    """Load the bundle's GGUF into one single-sequence context and run pp/tg."""
    from mlserve.engine.api import Sampling
    from mlserve.engine.llama.factory import Overrides, engine_config, open_model

    n_prompt, n_gen, repetitions, seed = test
    env = {**machine(), **_ref_env(bundle, threads, gpu_layers), "server": None, "bundle_digest": bundle.digest}
    n_ctx = -(-(max(n_prompt, n_gen + 1) + 16) // 256) * 256
    overrides = Overrides(ctx_size=n_ctx, parallel=1, threads=threads, gpu_layers=gpu_layers)
    config = engine_config(Store(), bundle, overrides)
    with err.status(f"loading {bundle.ref}") if err.is_terminal else _nothing() as status:
        model = open_model(config)
        try:
            results = run_offline(
                model,
                Sampling(max_tokens=1, temperature=0.0),
                n_prompt=n_prompt,
                n_gen=n_gen,
                repetitions=repetitions,
                seed=seed,
                progress=(lambda text: status.update(f"{bundle.ref}: {text}")) if status is not None else None,
            )
        finally:
            model.close()
    env["workload"] = f"offline pp{n_prompt} tg{n_gen} x{repetitions}"
    return report.document(bundle.ref, bundle.ref, env, [r.as_dict() for r in results])


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _offline_table(doc: dict[str, Any]) -> Table:
    table = Table("model", "threads", "gpu layers", "test", "t/s", box=None, title="offline (llama-bench style)")
    env = doc["env"]
    for r in doc["results"]:
        speed = f"{report.fmt(r['avg_ts'])} ± {report.fmt(r['stddev_ts'])}"
        table.add_row(doc["model"], str(env["threads"]), str(env["gpu_layers"]), r["test"], speed)
    return table


def _verdict(results: list[dict[str, Any]], slo: dict[str, float]) -> None:
    empty = [r for r in results if not r["completed"]]
    if empty:
        why = (empty[0].get("errors") or ["unknown error"])[0]
        raise CheckFailed(f"No request completed at {report.title(empty[0])}: {why}", "Check the server's log.")
    misses = report.slo_failures(results)
    if misses:
        raise CheckFailed(f"SLO missed: {'; '.join(misses)}.", "Lower the load or relax the --slo bounds.")
    if slo:
        info("SLO met at every level")
    failed = sum(r["failed"] for r in results)
    if failed:
        info(f"warning: {failed} request(s) failed: {'; '.join(results[0].get('errors', []))}")
