"""The clinical workload, side by side: mlserve (speculation on), mlserve (off) and llama-server.

    python benchmarks/clinical.py --llama-server PATH [--ref gemma3-270m] [--levels 1,2,4,8]
        [--max-tokens 256] [--rounds 2] [--servers spec,off,llama] [--output results.json]

Every server gets the same GGUF file (the bundle's), threads, slots (``-np``/``--parallel``)
and context per slot. All the named servers start at once and take turns level by level (one
measured at a time, the order rotating from level to level), so each level's figures for the
servers are minutes apart. Each request is a dialogue from
``benchmarks/data/dialogue-to-note.jsonl`` summarised with the bundle's discharge-summary
task prompt, rendered by the model's chat template exactly as ``mlserve eval`` sends it, and
sent to ``/v1/completions`` as token ids (so both servers decode the very same tokens),
greedy, streamed, timed by ``mlserve bench``'s client. Level c sends ``rounds * c``
requests, c at a time, with dialogues no earlier level used (no prompt cache helps).

``--baseline-src DIR`` adds ``spec-base`` and ``off-base``: the same two mlserve servers from
another source tree (e.g. ``git worktree add /tmp/base HEAD~1``), run with DIR as their working
directory, since ``python -m mlserve`` imports ``./mlserve`` before anything on PYTHONPATH. With
them, each level also prints this tree's tok/s and TTFT as ratios to the baseline's: a change's
before and after in one interleaved run.

Prints output tok/s, TTFT p50, TPOT, inter-token gap p50/p99/max, ratios to llama-server,
goodput under a gap SLO (no gap above --gap-slo-ms), and for mlserve with speculation the
acceptance rate and mean tokens per verification (from /metrics). ``--output`` keeps every
server's results in one JSON file and adds to it, so a long run can be done one server at a
time (each under the CPU lock) and the table printed from all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import start_llama_server, start_mlserve  # noqa: E402

from mlserve.bench.client import ClientPool  # noqa: E402
from mlserve.bench.loadgen import LoadGenerator  # noqa: E402
from mlserve.bench.metrics import RequestResult, percentile, summarize  # noqa: E402
from mlserve.bench.workload import DEFAULT_SYSTEM  # noqa: E402
from mlserve.bundles.store import Bundle, Store  # noqa: E402
from mlserve.engine.llama.factory import Overrides, create_engine, engine_config  # noqa: E402
from mlserve.eval.dataset import read_dataset  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "dialogue-to-note.jsonl"
TASK = "discharge-summary"
SERVERS = {
    "llama": "llama-server",
    "spec": "mlserve (speculation)",
    "spec-base": "baseline (speculation)",
    "off": "mlserve (no speculation)",
    "off-base": "baseline (no speculation)",
}
_COUNTER = re.compile(r"^(mlserve_speculative_\w+?)(?:_total)?\{[^}]*\} ([0-9.e+]+)$", re.MULTILINE)


def prompts(bundle: Bundle, path: Path, n: int, threads: int, ctx: int, max_tokens: int) -> list[list[int]]:
    """Token ids of the first dialogues that fit a slot: the task's system prompt, then the dialogue."""
    system = (bundle.manifest.get("serving", {}).get("prompts", {}).get(TASK) or {}).get("system") or DEFAULT_SYSTEM
    config = engine_config(Store(), bundle, Overrides(ctx_size=ctx, parallel=1, threads=threads))

    async def render() -> list[list[int]]:
        engine = create_engine(config)
        await engine.start()
        try:
            out = []
            for row in read_dataset(path):
                msgs = [{"role": "system", "content": system}, {"role": "user", "content": str(row["dialogue"])}]
                tokens = await engine.chat_tokens(msgs)
                if len(tokens) + max_tokens <= ctx:
                    out.append(tokens)
            return out
        finally:
            await engine.close()

    rows = asyncio.run(render())
    if len(rows) < n:
        print(f"note: only {len(rows)} dialogues fit a slot; levels reuse some", file=sys.stderr)
    return rows


def body(tokens: list[int], model: str, max_tokens: int) -> bytes:
    """A greedy, streamed /v1/completions request for these token ids."""
    data = {
        "model": model,
        "prompt": tokens,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(data).encode()


def spec_counters(url: str) -> dict[str, float]:
    """mlserve's speculation counters from /metrics (empty for llama-server)."""
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    return {name: float(value) for name, value in _COUNTER.findall(text)}


async def level(url: str, bodies: list[bytes], concurrency: int) -> tuple[list[RequestResult], float]:
    """``bodies`` sent ``concurrency`` at a time over a fresh pool (llama-server drops idle keep-alives)."""
    pool = ClientPool(concurrency, 1800.0)
    try:
        return await LoadGenerator(pool, url + "/v1/completions").closed(bodies, concurrency)
    finally:
        await pool.aclose()


def measure_level(
    url: str, model: str, concurrency: int, rows: list[list[int]], args: argparse.Namespace
) -> dict[str, Any]:
    """One level on one server: vLLM's summary plus gap p50/max, goodput under the gap SLO, speculation."""
    before = spec_counters(url)
    results, duration = asyncio.run(level(url, [body(t, model, args.max_tokens) for t in rows], concurrency))
    after = spec_counters(url)
    s = summarize(results, duration, max_concurrency=concurrency, request_rate=None, slo={"itl_ms": args.gap_slo_ms})
    gaps = [g * 1000 for r in results if r.ok for g in r.itl]
    s["p50_itl_ms"] = round(percentile(gaps, 50), 3)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    drafted = delta.get("mlserve_speculative_draft_tokens", 0.0)
    steps = delta.get("mlserve_speculative_verifications", 0.0)
    accepted = delta.get("mlserve_speculative_accepted_tokens", 0.0)
    s["spec_drafted"], s["spec_accepted"], s["spec_verifications"] = drafted, accepted, steps
    s["acceptance_rate"] = accepted / drafted if drafted else None
    s["tokens_per_verification"] = (accepted + steps) / steps if steps else None
    print(
        f"  c={concurrency}: {s['output_throughput']:.1f} tok/s, ttft p50 {s['median_ttft_ms']:.0f} ms, "
        f"gap p99 {s['p99_itl_ms']:.0f} max {s['max_itl_ms']:.0f} ms, {s['failed']} failed",
        file=sys.stderr,
        flush=True,
    )
    return s


def start_server(name: str, bundle: Bundle, plan: list[tuple[int, list[list[int]]]], args: argparse.Namespace) -> Any:
    """Start one server (llama-server, or mlserve with speculation on or off) and warm it up."""
    par, ctx, threads = str(args.parallel), str(args.ctx), str(args.threads)
    if name == "llama":
        path = Store().blob_path(bundle.model_sha256)
        server: Any = start_llama_server(args.llama_server, path, args.parallel, args.ctx, args.threads, args.port)
    else:
        mode, _, base = name.partition("-")
        flags = ["--parallel", par, "--ctx-size", ctx, "--threads", threads, "--request-timeout", "0"]
        flags += ["--speculate" if mode == "spec" else "--no-speculate"]
        if args.max_step_ms:
            flags += ["--max-step-ms", str(args.max_step_ms)]
        server = start_mlserve(bundle.ref, *flags, src=args.baseline_src.resolve() if base else None)
    warm = [body(plan[0][1][0][:64], bundle.ref, 4)]  # a prompt no level sends
    asyncio.run(level(server.url, warm, 1))
    return server


def run_interleaved(
    names: list[str], bundle: Bundle, plan: list[tuple[int, list[list[int]]]], args: argparse.Namespace
) -> dict[str, list[dict[str, Any]]]:
    """Every server up at once (idle ones cost no CPU); each level runs on each in turn, the order rotating.

    So the servers' figures for a level are minutes apart, not a whole run: this machine's speed
    drifts by 10-20% over tens of minutes, and a fixed order would favour whichever goes first.
    """
    servers: dict[str, Any] = {}
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    try:
        for name in names:
            servers[name] = start_server(name, bundle, plan, args)
        for i, (concurrency, rows) in enumerate(plan):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                print(f"{SERVERS[name]}:", file=sys.stderr, flush=True)
                out[name].append(measure_level(servers[name].url, bundle.ref, concurrency, rows, args))
    finally:
        for server in servers.values():
            server.stop()
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def table(doc: dict[str, Any]) -> str:
    """One block per level: every server's figures and its ratios to llama-server."""
    runs = doc["servers"]
    lines = [
        f"model {doc['model']}, {doc['threads']} threads, {doc['parallel']} slots x {doc['ctx']} ctx, "
        f"{doc['max_tokens']} tokens out, gap SLO {doc['gap_slo_ms']:.0f} ms"
    ]
    head = (
        "server",
        "tok/s",
        "TTFT p50 ms",
        "TPOT ms",
        "gap p50",
        "gap p99",
        "gap max",
        "goodput",
        "tok/s ratio",
        "TTFT ratio",
        "accept",
        "tok/verify",
    )
    for i, c in enumerate(doc["levels"]):
        lines += ["", f"concurrency {c}", " | ".join(head), "-" * 120]
        base = runs.get("llama", [None] * (i + 1))[i] if "llama" in runs else None
        for name in SERVERS:
            if name not in runs or i >= len(runs[name]):
                continue
            r = runs[name][i]
            acc = f"{r['acceptance_rate']:.2f}" if r.get("acceptance_rate") is not None else "-"
            tpv = f"{r['tokens_per_verification']:.2f}" if r.get("tokens_per_verification") is not None else "-"
            row = (
                SERVERS[name],
                f"{r['output_throughput']:.1f}",
                f"{r['median_ttft_ms']:.0f}",
                f"{r['mean_tpot_ms']:.1f}",
                f"{r['p50_itl_ms']:.0f}",
                f"{r['p99_itl_ms']:.0f}",
                f"{r['max_itl_ms']:.0f}",
                f"{r['request_goodput']:.3f}",
                _ratio(r["output_throughput"], base and base["output_throughput"]),
                _ratio(r["median_ttft_ms"], base and base["median_ttft_ms"]),
                acc,
                tpv,
            )
            lines.append(" | ".join(row))
        for mode in ("spec", "off"):
            ours, older = runs.get(mode, [])[i : i + 1], runs.get(f"{mode}-base", [])[i : i + 1]
            if ours and older:
                tok = _ratio(ours[0]["output_throughput"], older[0]["output_throughput"])
                ttft = _ratio(ours[0]["median_ttft_ms"], older[0]["median_ttft_ms"])
                lines.append(f"{SERVERS[mode]} / its baseline: tok/s {tok}, TTFT {ttft}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="gemma3-270m")
    parser.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (needed for 'llama')")
    parser.add_argument("--levels", default="1,2,4,8")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="requests per level = rounds x concurrency")
    parser.add_argument(
        "--servers", default="spec,off,llama", help="which to run, in order: spec, off, llama, spec-base, off-base"
    )
    parser.add_argument("--baseline-src", type=Path, default=None, help="the source tree spec-base and off-base serve")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=2600, help="context per slot")
    parser.add_argument("--gap-slo-ms", type=float, default=500.0, help="a request is good when no gap exceeds it")
    parser.add_argument("--max-step-ms", type=float, default=None, help="mlserve serve --max-step-ms")
    parser.add_argument("--port", type=int, default=18734, help="llama-server's port")
    parser.add_argument("--dataset", type=Path, default=DATA)
    parser.add_argument("--output", type=Path, default=None, help="JSON file that keeps (and adds to) the results")
    parser.add_argument("--table", action="store_true", help="only print the table of --output")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    doc: dict[str, Any] = {"servers": {}}
    if args.output and args.output.exists():
        doc = json.loads(args.output.read_text())
    if not args.table:
        names = [n.strip() for n in args.servers.split(",") if n.strip()]
        if "llama" in names and not args.llama_server:
            parser.error("--llama-server PATH is needed to run llama-server")
        unknown = [n for n in names if n not in SERVERS]
        if unknown:
            parser.error(f"unknown server {unknown[0]!r}: choose from {', '.join(SERVERS)}")
        base_ok = args.baseline_src is not None and (args.baseline_src / "mlserve").is_dir()
        if any(n.endswith("-base") for n in names) and not base_ok:
            parser.error("spec-base and off-base need --baseline-src DIR, a tree with mlserve/ in it")
        bundle = Store().resolve(args.ref)
        rows = prompts(bundle, args.dataset, args.rounds * sum(levels), args.threads, args.ctx, args.max_tokens)
        plan, at = [], 0
        for c in levels:
            n = args.rounds * c
            plan.append((c, [rows[(at + i) % len(rows)] for i in range(n)]))
            at += n
        setup = {
            "model": bundle.ref,
            "levels": levels,
            "threads": args.threads,
            "parallel": args.parallel,
            "ctx": args.ctx,
            "max_tokens": args.max_tokens,
            "gap_slo_ms": args.gap_slo_ms,
            "rounds": args.rounds,
        }
        if doc.get("servers") and any(doc.get(k) != v for k, v in setup.items()):
            doc = {"servers": {}}  # another setup: start afresh
        doc.update(setup)
        doc["servers"].update(run_interleaved(names, bundle, plan, args))
        if args.output:
            args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))


if __name__ == "__main__":
    main()
