"""Embedding throughput (inputs/s) at 1, 8 and 32 inputs per request, through HTTP, in one run.

    python benchmarks/embeddings.py [--ref gemma3-270m] [--inputs 96] [--embeddings-ctx 1024] [--clients 8]

One server (``serve --embeddings``, started here on a free loopback port). The inputs are
turns of the clinical dialogues in benchmarks/data (40 to 120 characters, about 10 to 30
tokens). For each batch size B the same inputs are sent as requests of B inputs, one request
at a time, so one request is one embeddings decode; then the B=1 requests again from
``--clients`` concurrent clients, where the server packs inputs of different requests into
shared decodes. The server's ``mlserve_embedding_batch_inputs`` histogram confirms how many
inputs each decode held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import start_mlserve  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "dialogue-to-note.jsonl"


def turns(n: int) -> list[str]:
    """``n`` dialogue turns of 40 to 120 characters, speaker tags removed."""
    out: list[str] = []
    for line in DATA.read_text().splitlines():
        for turn in json.loads(line)["dialogue"].split("\n"):
            text = re.sub(r"^\[\w+\]\s*", "", turn).strip()
            if 40 <= len(text) <= 120:
                out.append(text)
                if len(out) == n:
                    return out
    raise SystemExit(f"only {len(out)} turns of 40-120 characters in {DATA}")


async def post(client: httpx.AsyncClient, url: str, model: str, inputs: list[str]) -> int:
    r = await client.post(url + "/v1/embeddings", json={"model": model, "input": inputs})
    r.raise_for_status()
    return int(r.json()["usage"]["prompt_tokens"])


async def sequential(client: httpx.AsyncClient, url: str, model: str, texts: list[str], batch: int) -> float:
    """Inputs/s sending ``batch`` inputs per request, one request at a time."""
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        await post(client, url, model, texts[i : i + batch])
    return len(texts) / (time.perf_counter() - t0)


async def concurrent(client: httpx.AsyncClient, url: str, model: str, texts: list[str], clients: int) -> float:
    """Inputs/s with ``clients`` clients each sending one input per request."""
    queue = list(texts)

    async def worker() -> None:
        while queue:
            await post(client, url, model, [queue.pop()])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return len(texts) / (time.perf_counter() - t0)


def histogram(metrics: str) -> tuple[float, float]:
    """(decode calls, inputs) from the server's embeddings histogram."""
    count = re.search(r"^mlserve_embedding_batch_inputs_count\{[^}]*\} (\S+)$", metrics, re.M)
    total = re.search(r"^mlserve_embedding_batch_inputs_sum\{[^}]*\} (\S+)$", metrics, re.M)
    return (float(count.group(1)) if count else 0.0), (float(total.group(1)) if total else 0.0)


async def run(url: str, model: str, texts: list[str], clients: int) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        await post(client, url, model, texts[:4])  # warm-up
        print(f"{len(texts)} inputs, {sum(len(t) for t in texts) / len(texts):.0f} characters on average")
        print(f"{'mode':<26} {'inputs/s':>9} {'inputs per decode':>18}")
        modes = [(f"batch {b}, one client", b, 1) for b in (1, 8, 32)] + [(f"batch 1, {clients} clients", 1, clients)]
        for name, batch, n_clients in modes:
            before = histogram((await client.get(url + "/metrics")).text)
            if n_clients == 1:
                rate = await sequential(client, url, model, texts, batch)
            else:
                rate = await concurrent(client, url, model, texts, n_clients)
            after = histogram((await client.get(url + "/metrics")).text)
            calls, inputs = after[0] - before[0], after[1] - before[1]
            print(f"{name:<26} {rate:>9.1f} {inputs / calls if calls else 0:>18.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="gemma3-270m")
    parser.add_argument("--inputs", type=int, default=96, help="a multiple of 32")
    parser.add_argument("--embeddings-ctx", type=int, default=1024, help="must hold 32 inputs (~30 tokens each)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    texts = turns(args.inputs)
    flags = ["--embeddings", "--embeddings-ctx", str(args.embeddings_ctx), "--parallel", "1", "--ctx-size", "512"]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    server = start_mlserve(args.ref, *flags)
    try:
        asyncio.run(run(server.url, args.ref, texts, args.clients))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
