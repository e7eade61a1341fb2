"""The price of a deterministic request: aggregate tokens/s of 8 batched streams with and without one running.

    python benchmarks/deterministic_cost.py [--ref gemma3-270m] [--streams 8] [--tokens 128] [--repeats 1]

One `mlserve serve REF --parallel STREAMS+1` is started. Each repeat runs, one after the other:

- *without*: STREAMS streamed /v1/completions requests (distinct prompts, greedy, max_tokens=--tokens)
  sent at once; aggregate = their completion tokens / wall time from send to the last byte;
- *with*: the same STREAMS requests while one deterministic request (``"mlserve":
  {"deterministic": true}``, greedy, its own prompt) is kept running from before the first to
  after the last (re-sent each time it finishes); aggregate counts the STREAMS requests only,
  and the deterministic request's own tokens/s is printed beside it.

A deterministic request is decoded in a llama_decode call of its own each step, after the
batch of the others, so the batch waits for that call: the figure printed is what the other
streams pay for it.
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

DET_PROMPT = "The patient reports three days of knee pain after a fall. Clinical note:"


def prompt(i: int, repeat: int, phase: str) -> str:
    return f"Story {phase} {repeat}.{i}: Once upon a time, in a lighthouse by the sea,"


async def deterministic_loop(client: httpx.AsyncClient, url: str, model: str, stop: asyncio.Event) -> tuple[int, float]:
    """Keep one deterministic request running until ``stop``; (tokens, seconds) it generated."""
    body = {"model": model, "prompt": DET_PROMPT, "max_tokens": 64, "temperature": 0}
    body["mlserve"] = {"deterministic": True}
    tokens, started = 0, time.perf_counter()
    while not stop.is_set():
        resp = await client.post(url + "/v1/completions", json=body)
        resp.raise_for_status()
        tokens += int(resp.json()["usage"]["completion_tokens"])
    return tokens, time.perf_counter() - started


async def level(url: str, model: str, streams: int, n_tokens: int, repeat: int, with_det: bool) -> tuple[float, float]:
    """(aggregate tok/s of the batched streams, tok/s of the deterministic request or 0)."""
    limits = httpx.Limits(max_connections=streams + 1, max_keepalive_connections=streams + 1)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        stop = asyncio.Event()
        det = asyncio.create_task(deterministic_loop(client, url, model, stop)) if with_det else None
        if det is not None:
            await asyncio.sleep(0.5)  # it is decoding before the others arrive
        phase = "with" if with_det else "without"
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(stream_completion(client, url, model, prompt(i, repeat, phase), n_tokens) for i in range(streams))
        )
        wall = time.perf_counter() - t0
        det_rate = 0.0
        if det is not None:
            stop.set()
            det_tokens, det_seconds = await det
            det_rate = det_tokens / det_seconds
    return sum(r.tokens for r in results) / wall, det_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="gemma3-270m")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    flags = ["--parallel", str(args.streams + 1), "--ctx-size", "1024"]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    server = start_mlserve(args.ref, *flags)
    try:
        asyncio.run(level(server.url, args.ref, args.streams, 16, -1, True))  # warm-up, both paths
        without, with_, det = [], [], []
        for r in range(args.repeats):
            without.append(asyncio.run(level(server.url, args.ref, args.streams, args.tokens, r, False))[0])
            agg, rate = asyncio.run(level(server.url, args.ref, args.streams, args.tokens, r, True))
            with_.append(agg)
            det.append(rate)
            print(f"repeat {r + 1}: without {without[-1]:.1f} tok/s, with {agg:.1f} tok/s (deterministic {rate:.1f})")
    finally:
        server.stop()
    a, b, d = statistics.median(without), statistics.median(with_), statistics.median(det)
    print(f"\n{args.ref}, {args.streams} streams x {args.tokens} tokens, median of {args.repeats}:")
    print("| batched streams | + 1 deterministic | ratio | deterministic request alone |")
    print("|---:|---:|---:|---:|")
    print(f"| {a:.1f} tok/s | {b:.1f} tok/s | {b / a:.2f} | {d:.1f} tok/s |")


if __name__ == "__main__":
    main()
