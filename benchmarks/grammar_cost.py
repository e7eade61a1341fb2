"""The cost of structured output per generated token: the same prompts with and without a JSON grammar.

    python benchmarks/grammar_cost.py [--ref gemma3-270m] [--prompts 8] [--max-tokens 128] [--concurrency 1]

One server (started here on a free loopback port), greedy decoding, streamed chat completions.
Each prompt asks for a JSON summary of a clinical dialogue (benchmarks/data); it is sent once
free and once with ``response_format: {"type": "json_object"}`` (the grammar sampler on),
alternating so drift in machine load hits both alike. Decode speed per request is
(tokens - 1) / (last token - first token), which leaves prompt processing out; the report gives
the median per mode, the ratio and the grammar's cost in milliseconds per token. A second
pass with a schema (required fields, enums, a nested object) shows a richer grammar's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import start_mlserve  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "dialogue-to-note.jsonl"
SCHEMA = {
    "type": "object",
    "properties": {
        "chief_complaint": {"type": "string"},
        "severity": {"enum": ["low", "moderate", "high"]},
        "vitals": {
            "type": "object",
            "properties": {"heart_rate": {"type": "integer"}, "temperature_c": {"type": "number"}},
            "required": ["heart_rate", "temperature_c"],
        },
        "medications": {"type": "array", "items": {"type": "string"}},
        "follow_up": {"type": "boolean"},
    },
    "required": ["chief_complaint", "severity", "vitals", "medications", "follow_up"],
}
FORMATS: dict[str, dict[str, Any] | None] = {
    "free": None,
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema", "json_schema": {"name": "note", "schema": SCHEMA}},
}


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, fmt: Any, max_tokens: int) -> float:
    """Decode tokens/s of one streamed, greedy chat completion."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if fmt is not None:
        body["response_format"] = fmt
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    if tokens < 2 or last <= first:
        raise RuntimeError(f"too few tokens streamed ({tokens}); raise --max-tokens")
    return (tokens - 1) / (last - first)


async def run(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict[str, list[float]]:
    speeds: dict[str, list[float]] = {name: [] for name in FORMATS}
    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, url, model, "Say hello.", None, 8)  # warm-up
        for i in range(0, len(prompts), concurrency):
            group = prompts[i : i + concurrency]
            order = list(FORMATS.items()) if (i // concurrency) % 2 == 0 else list(reversed(FORMATS.items()))
            for name, fmt in order:
                got = await asyncio.gather(*(one(client, url, model, p, fmt, max_tokens) for p in group))
                speeds[name] += got
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="gemma3-270m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight together per mode")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()][: args.prompts]
    prompts = [
        "Summarise this doctor-patient dialogue as a JSON object with the chief complaint, severity, "
        "vitals, medications and whether follow-up is needed.\n\n" + row["dialogue"][:1500]
        for row in rows
    ]
    flags = ["--parallel", str(max(1, args.concurrency)), "--ctx-size", "2048"]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    server = start_mlserve(args.ref, *flags)
    try:
        speeds = asyncio.run(run(server.url, args.ref, prompts, args.max_tokens, args.concurrency))
    finally:
        server.stop()
    free = statistics.median(speeds["free"])
    print(f"{args.ref}, greedy, {len(prompts)} prompts, concurrency {args.concurrency}, decode tokens/s per request")
    print(f"{'mode':<12} {'median tok/s':>12} {'ratio':>7} {'ms/token added':>15}")
    for name, values in speeds.items():
        med = statistics.median(values)
        added = 1000 / med - 1000 / free
        print(f"{name:<12} {med:>12.1f} {med / free:>7.3f} {added:>15.2f}")


if __name__ == "__main__":
    main()
