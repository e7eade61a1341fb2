"""How many streamed requests/s one `mlserve bench` client process sustains against an instant server.

Run: ``.venv/bin/python benchmarks/bench_overhead.py [--requests N]``. The fake server
(tests/fake_openai.py) runs in its own process and answers every request at once with
4 SSE token chunks, a usage chunk and [DONE]; what is left is the client's own cost.
Exits 1 when the best level is under 500 requests/s (the project's requirement).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlserve.bench.loadgen import Level  # noqa: E402
from mlserve.bench.runner import Plan, run  # noqa: E402
from mlserve.bench.workload import synthetic  # noqa: E402
from tests.support.fake_openai import serve_in_process  # noqa: E402

REQUIRED = 500.0


def main() -> int:
    """Measure each concurrency level and print requests/s."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", default="1,8,32,64")
    ns = parser.parse_args()
    levels = [Level(int(c)) for c in ns.concurrency.split(",")]
    with serve_in_process() as url:
        results = run(Plan(url, synthetic("fake", ns.requests, 16, 4), levels, warmup=50))
    for r in results:
        print(
            f"concurrency {r['max_concurrency']:>3}: {r['request_throughput']:8.1f} req/s  "
            f"(median e2el {r['median_e2el_ms']:.2f} ms, {r['failed']} failed)"
        )
    best = max(r["request_throughput"] for r in results)
    print(f"best: {best:.0f} req/s (required: {REQUIRED:.0f})")
    return 0 if best >= REQUIRED else 1


if __name__ == "__main__":
    sys.exit(main())
