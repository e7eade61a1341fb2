"""``bench --dataset``: fresh dialogues per level, the task prompt, and the longest gap."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mlserve.bench.metrics import RequestResult, summarize
from mlserve.bench.workload import dataset
from tests.conftest import CliResult
from tests.support.fake_openai import serve_in_thread

DATASET = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "dialogue-to-note.jsonl"
Cli = Callable[..., CliResult]


def _dialogue(body: bytes) -> str:
    return str(json.loads(body)["messages"][1]["content"])


def test_each_level_gets_its_own_dialogues() -> None:
    w = dataset("m", DATASET, 3, 16, system="Write a note.", levels=4)
    assert len(w.per_level) == 4 and w.bodies == w.per_level[0]
    seen = [_dialogue(b) for level in w.per_level for b in level]
    assert len(set(seen)) == 12  # 4 levels x 3 requests, no dialogue twice
    assert json.loads(w.bodies[0])["messages"][0]["content"] == "Write a note."
    # More than the dataset holds: no per-level rows (the runner then prefixes each level's prompts).
    assert dataset("m", DATASET, 30, 16, levels=2).per_level == ()


def test_summary_reports_the_longest_gap_and_gap_goodput() -> None:
    results = [
        RequestResult(True, e2el=1.0, ttft=0.2, itl=[0.05, 0.05, 0.6], output_tokens=4),
        RequestResult(True, e2el=1.0, ttft=0.2, itl=[0.05, 0.1, 0.1], output_tokens=4),
    ]
    out = summarize(results, 2.0, max_concurrency=2, request_rate=None, slo={"itl_ms": 150})
    assert out["max_itl_ms"] == 600.0 and out["median_itl_ms"] == 75.0
    assert out["good"] == 1 and out["request_goodput"] == 0.5  # the request with a 600 ms freeze is not good


def test_task_needs_a_dataset_and_a_known_task(cli: Cli) -> None:
    with serve_in_thread() as (url, opts):
        opts.ready.set()
        no_dataset = cli("bench", url, "--task", "discharge-summary", "--model", "fake")
        no_recipe = cli("bench", url, "--task", "discharge-summary", "--dataset", DATASET, "--model", "fake")
    assert no_dataset.exit_code == 2 and "--dataset" in no_dataset.stderr
    assert no_recipe.exit_code == 2 and "no such task prompt" in no_recipe.stderr
