"""Aggregate output tokens/s at concurrency 1/4/8/16, side by side in one run:

- a bare batched llama_decode loop (B sequences, one token each per decode, native samplers),
- mlserve serve over HTTP (streamed /v1/completions, continuous batching),
- llama.cpp's own llama-server over HTTP, when --llama-server BIN is given,
- mlserve from another source tree (e.g. `git worktree add /tmp/base HEAD~1`), when
  --baseline-src DIR is given: a regression check of a change, in the same run.

    python benchmarks/concurrency.py [--ref gemma3-270m] [--llama-server PATH] [--baseline-src DIR] [--tokens 64]

The baseline's server runs with DIR as its working directory: `python -m mlserve` imports
./mlserve before anything on PYTHONPATH, so that is what makes it serve DIR's code.

Each HTTP level runs `concurrency` clients that each send --rounds requests back to back
(distinct short prompts, max_tokens=--tokens, greedy); aggregate = completion tokens
(from the server's usage) / wall time. Servers run one at a time, never side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Server, start_llama_server, start_mlserve, stream_completion  # noqa: E402

from mlserve.bench.local_server import LocalServer  # noqa: E402
from mlserve.bundles.store import Store  # noqa: E402
from mlserve.engine.api import Sampling  # noqa: E402
from mlserve.engine.llama.factory import EngineConfig, default_threads, open_model  # noqa: E402

LEVELS = (1, 4, 8, 16)
CTX = 1024


def prompt(i: int) -> str:
    return f"Story number {i}: Once upon a time"


def bare_batched(path: Path, levels: tuple[int, ...], n_tokens: int, threads: int) -> dict[int, float]:
    """Tokens/s of B sequences decoded together, one token each per llama_decode (prefill excluded)."""
    model = open_model(EngineConfig(path, "bare", ctx_size=CTX, parallel=max(levels), threads=threads))
    out = {}
    try:
        for b in levels:
            prompts = [model.tokenize(prompt(i)) for i in range(b)]
            samplers = [model.new_sampler(Sampling(max_tokens=1, temperature=0)) for _ in range(b)]
            tokens, pos, seqs, want, last = [], [], [], [], []
            for s, p in enumerate(prompts):
                tokens += p
                pos += range(len(p))
                seqs += [s] * len(p)
                want += [False] * (len(p) - 1) + [True]
                last.append(len(tokens) - 1)
            model.decode(tokens, pos, seqs, want)
            cur = [model.sample(samplers[s], last[s]) for s in range(b)]
            n_past = [len(p) for p in prompts]
            t0 = time.perf_counter()
            for k in range(n_tokens - 1):
                model.decode(cur, [n + k for n in n_past], list(range(b)), [True] * b)
                cur = [model.sample(samplers[s], s) for s in range(b)]
            out[b] = b * (n_tokens - 1) / (time.perf_counter() - t0)
            for s in range(b):
                model.free_sampler(samplers[s])
                model.clear_seq(s)
    finally:
        model.close()
    return out


async def http_level(url: str, model: str, concurrency: int, rounds: int, n_tokens: int) -> float:
    # A fresh connection per request: llama-server drops idle keep-alive connections, which a
    # pooled client then trips over; loopback connects cost well under a millisecond.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await stream_completion(client, url, model, prompt(999), 4)

        async def worker(w: int) -> int:
            total = 0
            for r in range(rounds):
                total += (await stream_completion(client, url, model, prompt(w * rounds + r), n_tokens)).tokens
            return total

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return sum(counts) / (time.perf_counter() - t0)


def http_levels(
    server: Server | LocalServer, model: str, levels: tuple[int, ...], rounds: int, n_tokens: int
) -> dict[int, float]:
    out = {}
    try:
        for c in levels:
            out[c] = asyncio.run(http_level(server.url, model, c, rounds, n_tokens))
            print(f"  {server.url} concurrency {c}: {out[c]:.1f} tok/s", file=sys.stderr, flush=True)
        return out
    finally:
        server.stop()


def against_baseline(
    ref: str, src: Path, levels: tuple[int, ...], args: argparse.Namespace
) -> tuple[dict[int, float], dict[int, float]]:
    """Both mlserve trees up at once, measured one at a time, alternating, --repeats times; medians.

    Only the server under load uses the CPU (the other idles), and alternating the order each
    repeat spreads the machine's drift over both, so the ratio holds where absolute figures move.
    """
    flags = ("--parallel", str(max(levels)), "--ctx-size", str(CTX))
    ours_srv = start_mlserve(ref, *flags)
    base_srv = start_mlserve(ref, *flags, src=src.resolve())  # the baseline's server imports its own tree
    runs: dict[str, dict[int, list[float]]] = {"ours": {c: [] for c in levels}, "base": {c: [] for c in levels}}
    try:
        for c in levels:
            for r in range(args.repeats):
                order = [("ours", ours_srv), ("base", base_srv)]
                for name, srv in order if r % 2 == 0 else order[::-1]:
                    runs[name][c].append(asyncio.run(http_level(srv.url, ref, c, args.rounds, args.tokens)))
            print(f"  concurrency {c}: ours {runs['ours'][c]} base {runs['base'][c]}", file=sys.stderr, flush=True)
    finally:
        ours_srv.stop()
        base_srv.stop()
    med = {name: {c: statistics.median(v) for c, v in per.items()} for name, per in runs.items()}
    return med["ours"], med["base"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="gemma3-270m")
    parser.add_argument("--llama-server", default=None, help="path to llama.cpp's llama-server binary")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--baseline-src", default=None, help="another mlserve source tree to run as a baseline")
    parser.add_argument("--repeats", type=int, default=5, help="alternating measurements per level (baseline runs)")
    args = parser.parse_args()
    levels = tuple(int(x) for x in args.levels.split(","))
    store = Store()
    bundle = store.resolve(args.ref)
    path = store.blob_path(bundle.model_sha256)
    threads = default_threads()
    par = str(max(levels))
    bare = bare_batched(path, levels, args.tokens, threads)
    ours = (
        {}
        if args.baseline_src
        else http_levels(
            start_mlserve(bundle.ref, "--parallel", par, "--ctx-size", str(CTX)),
            bundle.ref,
            levels,
            args.rounds,
            args.tokens,
        )
    )
    base: dict[int, float] = {}
    if args.baseline_src:
        ours, base = against_baseline(bundle.ref, Path(args.baseline_src), levels, args)
    theirs: dict[int, float] = {}
    if args.llama_server:
        server = start_llama_server(args.llama_server, path, max(levels), CTX, threads, 18731)
        theirs = http_levels(server, bundle.ref, levels, args.rounds, args.tokens)
    print(f"model {bundle.ref} ({bundle.digest[:19]}), {threads} threads, {args.tokens} output tokens/request")
    if base:
        print("conc | bare loop | mlserve | baseline | mlserve/bare | baseline/bare | mlserve/baseline")
        for c in levels:
            print(
                f"{c:>4} | {bare[c]:9.1f} | {ours[c]:7.1f} | {base[c]:8.1f} | {ours[c] / bare[c]:12.2f} |"
                f" {base[c] / bare[c]:13.2f} | {ours[c] / base[c]:16.2f}"
            )
    cols = ("conc", "bare loop", "mlserve", "llama-server", "mlserve/bare", "mlserve/llama-server")
    head = " | ".join(f"{c:>{w}}" for c, w in zip(cols, (4, 9, 8, 12, 12, 20), strict=True))
    print(head)
    print("-" * len(head))
    for c in levels:
        ls = theirs.get(c)
        ls_txt = f"{ls:12.1f}" if ls else f"{'-':>12}"
        ratio = f"{ours[c] / ls:20.2f}" if ls else f"{'-':>20}"
        print(f"{c:>4} | {bare[c]:9.1f} | {ours[c]:8.1f} | {ls_txt} | {ours[c] / bare[c]:12.2f} | {ratio}")


if __name__ == "__main__":
    main()
