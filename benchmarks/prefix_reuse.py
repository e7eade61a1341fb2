"""Time to first token with and without prefix reuse, through HTTP, in one run.

    python benchmarks/prefix_reuse.py [--ref gemma3-270m] [--prompts 5] [--prefix-chars 4000]

For each of N clinical dialogues (benchmarks/data), a first request sends the dialogue
plus question A (cold: nothing cached) and a second sends the same dialogue plus
question B (warm: the dialogue's cells are still in the slot the first one used).
TTFT is send to first streamed token. The server's prefix-cache counters are read
from /metrics to confirm the warm requests hit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import start_mlserve  # noqa: E402

from mlserve.bundles.store import Store  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "dialogue-to-note.jsonl"


async def ttft(client: httpx.AsyncClient, url: str, model: str, prompt: str) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    elapsed = None
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if elapsed is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                elapsed = time.perf_counter() - t0
    if elapsed is None:
        raise RuntimeError("no token streamed")
    return elapsed


async def run(url: str, model: str, dialogues: list[str]) -> tuple[list[float], list[float], str]:
    cold, warm = [], []
    async with httpx.AsyncClient(timeout=300) as client:
        await ttft(client, url, model, "Hello")
        for text in dialogues:
            cold.append(await ttft(client, url, model, text + "\n\nQuestion: What is the chief complaint?\nAnswer:"))
            warm.append(await ttft(client, url, model, text + "\n\nQuestion: Which medications are given?\nAnswer:"))
        metrics = (await client.get(url + "/metrics")).text
    return cold, warm, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="gemma3-270m")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--prefix-chars", type=int, default=4000)
    args = parser.parse_args()
    bundle = Store().resolve(args.ref)
    lines = DATA.read_text().splitlines()[: args.prompts]
    dialogues = [json.loads(line)["dialogue"][: args.prefix_chars] for line in lines]
    server = start_mlserve(bundle.ref, "--parallel", "2", "--ctx-size", "2048")
    try:
        cold, warm, metrics = asyncio.run(run(server.url, bundle.ref, dialogues))
    finally:
        server.stop()
    hits = re.search(r"mlserve_prefix_cache_hits_total\{[^}]*\} (\S+)", metrics)
    reused = re.search(r"mlserve_prefix_cache_tokens_total\{[^}]*\} (\S+)", metrics)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"model {bundle.ref}, {len(dialogues)} dialogues of {args.prefix_chars} characters")
    print(f"cold TTFT (nothing cached) : median {c * 1000:7.1f} ms  runs {[round(x * 1000) for x in cold]}")
    print(f"warm TTFT (prefix reused)  : median {w * 1000:7.1f} ms  runs {[round(x * 1000) for x in warm]}")
    print(f"speed-up cold / warm       : {c / w:7.1f}x")
    print(f"prefix-cache hits {hits.group(1) if hits else '?'}, tokens reused {reused.group(1) if reused else '?'}")


if __name__ == "__main__":
    main()
