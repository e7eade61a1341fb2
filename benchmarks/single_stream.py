"""Single-stream decode tokens/s through HTTP, as a ratio to a bare llama_decode loop (same run).

    python benchmarks/single_stream.py [--ref gemma3-270m] [--tokens 128] [--rounds 3]

The bare loop is mlserve's own thin llama.cpp wrapper: one sequence, a greedy native
sampler, no Python beyond the loop. The HTTP figure streams /v1/completions from
`mlserve serve` with its default settings; decode speed is (tokens - 1) / (last - first
streamed token), so prompt processing is excluded from both.
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
from _common import start_mlserve, stream_completion  # noqa: E402

from mlserve.bundles.store import Store  # noqa: E402
from mlserve.engine.api import Sampling  # noqa: E402
from mlserve.engine.llama.factory import EngineConfig, default_threads, open_model  # noqa: E402

PROMPT = "Once upon a time"


def bare_decode(path: Path, n_tokens: int, threads: int) -> float:
    """Tokens/s of a bare single-sequence llama_decode loop (prefill excluded)."""
    model = open_model(EngineConfig(path, "bare", ctx_size=1024, parallel=1, threads=threads))
    try:
        prompt = model.tokenize(PROMPT)
        sampler = model.new_sampler(Sampling(max_tokens=1, temperature=0))
        n = len(prompt)
        model.decode(prompt, list(range(n)), [0] * n, [False] * (n - 1) + [True])
        token = model.sample(sampler, n - 1)
        t0 = time.perf_counter()
        for k in range(n_tokens - 1):
            model.decode([token], [n + k], [0], [True])
            token = model.sample(sampler, 0)
        elapsed = time.perf_counter() - t0
        model.free_sampler(sampler)
        return (n_tokens - 1) / elapsed
    finally:
        model.close()


async def http_decode(url: str, model: str, n_tokens: int) -> float:
    async with httpx.AsyncClient(timeout=300) as client:
        r = await stream_completion(client, url, model, PROMPT, n_tokens)
    return (r.tokens - 1) / (r.last - r.first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="gemma3-270m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    store = Store()
    bundle = store.resolve(args.ref)
    path = store.blob_path(bundle.model_sha256)
    threads = default_threads()
    server = start_mlserve(bundle.ref)
    bare, http = [], []
    try:
        asyncio.run(http_decode(server.url, bundle.ref, 8))  # warm the server's caches
        for _ in range(args.rounds):  # interleaved so drift hits both alike
            http.append(asyncio.run(http_decode(server.url, bundle.ref, args.tokens)))
            server.proc.send_signal(19)  # SIGSTOP: the idle server must not share the CPU
            try:
                bare.append(bare_decode(path, args.tokens, threads))
            finally:
                server.proc.send_signal(18)  # SIGCONT
    finally:
        server.stop()
    b, h = statistics.median(bare), statistics.median(http)
    print(f"model {bundle.ref} ({bundle.digest[:19]}), {threads} threads, {args.tokens} tokens, {args.rounds} rounds")
    print(f"bare llama_decode loop : {b:7.1f} tok/s  (runs: {', '.join(f'{x:.1f}' for x in bare)})")
    print(f"mlserve HTTP stream    : {h:7.1f} tok/s  (runs: {', '.join(f'{x:.1f}' for x in http)})")
    print(f"ratio HTTP / bare      : {h / b:7.3f}")


if __name__ == "__main__":
    main()
