"""``mlserve eval``: scoring, the dataset reader, stored results, and the quality gate of ``promote``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mlserve.bundles.store import Store
from mlserve.errors import InvalidInputError
from mlserve.eval import results
from mlserve.eval.dataset import read_pairs
from mlserve.eval.scoring import score_note, section_coverage, sections
from mlserve.security import audit
from tests.conftest import CliResult
from tests.support.servers import start_server
from tests.support.storeutil import REPO, assert_one_error

DATA = REPO / "benchmarks" / "data" / "dialogue-to-note.jsonl"
Cli = Callable[..., CliResult]


def rows(n: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in DATA.read_text().splitlines()[:n]]


# -- scoring ----------------------------------------------------------------------------------------
def test_rouge_is_f1_with_stemming() -> None:
    s = score_note("The patients were running", "the patient runs")
    # Stemmed: [the, patient, were, run] against [the, patient, run]: P 3/4, R 3/3.
    assert s.rouge1 == pytest.approx(2 * 0.75 / 1.75)
    assert score_note("same words here", "same words here").rougeL == 1.0
    assert s.length_ratio == pytest.approx(4 / 3)


def test_sections_of_reference_notes() -> None:
    first, _, third = rows(3)
    assert sections(first["note"]) == [
        "chief complaint",
        "history of present illness",
        "review of systems",
        "physical exam",
        "vitals",
        "results",
        "assessment and plan",
    ]
    # "CC:" and "HPI:" are the same sections under their abbreviations; "BP: 169/74." is no heading.
    assert sections(third["note"])[:2] == ["chief complaint", "history of present illness"]
    assert sections("CHIEF COMPLAINT\n\nKnee pain.\n\nBP: 120/80.\nPLAN\nRest.") == ["chief complaint", "plan"]


def test_section_coverage_reads_markup_and_abbreviations() -> None:
    reference = "CHIEF COMPLAINT\nx\nHISTORY OF PRESENT ILLNESS\ny\nPHYSICAL EXAMINATION\nz\nASSESSMENT AND PLAN\nw"
    note = "**Chief Complaint:** knee pain\n## HPI\nFell three days ago.\nAssessment & Plan: rest"
    assert section_coverage(note, reference) == 0.75  # no exam section
    assert section_coverage("The chief complaint is knee pain.", reference) == 0.0  # named mid-line, not a heading
    assert section_coverage("anything", "no headings at all") == 1.0


def test_copying_the_transcript_scores_about_33_rouge1() -> None:
    """ACI-Bench's reference point: the transcript itself as the note scores ROUGE-1 of about 33."""
    scores = [score_note(r["dialogue"], r["note"], r["dialogue"]) for r in rows(3)]
    mean = sum(s.rouge1 for s in scores) / len(scores)
    assert 0.28 < mean < 0.40, mean
    assert all(s.length_ratio > 1.5 for s in scores)  # transcripts are longer than notes
    assert all(s.transcript_overlap == 1.0 for s in scores)  # every word pair is the transcript's
    note = rows(1)[0]
    assert score_note(note["note"], note["note"], note["dialogue"]).transcript_overlap < 0.6  # a real note rewords


def test_read_pairs(tmp_path: Path) -> None:
    pairs = read_pairs(DATA, limit=5)
    assert pairs.ids[:2] == ["train/D2N001", "train/D2N002"] and len(pairs.pairs) == 5 and pairs.total_rows == 40
    assert pairs.sha256 == hashlib.sha256(DATA.read_bytes()).hexdigest()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "dialogue": "hello"}) + "\n")
    with pytest.raises(InvalidInputError, match="'dialogue' and 'note'"):
        read_pairs(bad)


def test_read_pairs_of_one_split() -> None:
    valid = read_pairs(DATA, split="valid")
    assert len(valid.pairs) == 13 and all(i.startswith("valid/") for i in valid.ids) and valid.total_rows == 40
    assert read_pairs(DATA, limit=2, split="valid").ids == valid.ids[:2]  # the split first, then the limit
    with pytest.raises(InvalidInputError, match="no row of split 'test'") as exc:
        read_pairs(DATA, split="test")
    assert exc.value.hint == "Its splits: train, valid."


# -- eval end to end on a tiny model -----------------------------------------------------------------
@pytest.fixture
def small(tmp_path: Path) -> Path:
    """Three short dialogue -> note pairs (the tiny model's context is 256 tokens)."""
    path = tmp_path / "small.jsonl"
    lines = [
        {"id": f"p{i}", "dialogue": f"[doctor] how is the knee {i} ?\n[patient] it hurts", "note": note}
        for i, note in enumerate(["CHIEF COMPLAINT\nKnee pain.", "PLAN\nRest.", "HPI:\nThe knee hurts."])
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_eval_scores_stores_and_shows(home: Path, cli: Cli, tiny_pair: dict[str, str], small: Path) -> None:
    res = cli("eval", "tiny:1", "--dataset", small, "--max-tokens", "8", "--concurrency", "2", "--json")
    assert res.exit_code == 0, res
    doc = res.json()
    assert doc["digest"] == tiny_pair["1"] and doc["name"] == "tiny" and doc["version"] == "1"
    assert doc["dataset"]["sha256"] == hashlib.sha256(small.read_bytes()).hexdigest()
    assert doc["dataset"]["ids"] == ["p0", "p1", "p2"] and doc["completed"] == 3 and doc["failed"] == 0
    assert doc["task"] == {"name": "default", "max_tokens": 8, "temperature": 0.0, "deterministic": True}
    assert set(doc["scores"]) >= {"rouge1", "rouge2", "rougeL", "section_coverage", "length_ratio"}
    assert doc["latency"]["completed"] == 3 and doc["latency"]["p99_e2el_ms"] > 0
    assert all(len(item["output_sha256"]) == 64 for item in doc["items"])
    assert "hurts" not in json.dumps(doc)  # scores and hashes, never the text
    stored = Path(doc["file"])
    assert stored.parent == home / "evals" / "tiny" / "1" and results.load(stored)["scores"] == doc["scores"]
    shown = cli("show", "tiny:1", "--json").json()
    assert shown["eval"]["scores"] == doc["scores"] and shown["eval"]["file"] == str(stored)
    assert "latest eval" in cli("show", "tiny:1").stdout
    assert cli("show", "tiny:2", "--json").json()["eval"] is None
    # A running server (URL target): the same deterministic notes, stored under the version it names.
    with start_server(home, "--ctx-size", "1024", refs=["tiny:1"]) as server:
        again = cli("eval", server.url, "--dataset", small, "--max-tokens", "8", "--json")
    assert again.exit_code == 0, again
    assert [i["output_sha256"] for i in again.json()["items"]] == [i["output_sha256"] for i in doc["items"]]
    assert len(results.history(Store(), "tiny", "1")) == 2


def test_eval_refuses_bad_input(cli: Cli, tiny_pair: dict[str, str], small: Path, tmp_path: Path) -> None:
    res = cli("eval", "tiny:1", "--dataset", tmp_path / "none.jsonl")
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = cli("eval", "tiny:1", "--dataset", small, "--task", "discharge-summary")
    assert res.exit_code == 2 and "no task" in res.stderr
    assert_one_error(res.stderr)
    assert cli("eval", "tiny:9", "--dataset", small).exit_code == 2


# -- the promotion gate ----------------------------------------------------------------------------------
def stored_eval(version: str, digest: str, scores: dict[str, float], **changes: Any) -> Path:
    """An eval document as `mlserve eval` stores it, with chosen scores."""
    doc: dict[str, Any] = {
        "kind": results.KIND,
        "schema": 1,
        "time": f"2030-01-01T00:00:0{len(results.history(Store(), 'tiny', version))}.000000Z",
        "name": "tiny",
        "version": version,
        "digest": digest,
        "dataset": {"file": "d.jsonl", "sha256": "d" * 64, "rows": 40, "ids": ["a", "b"]},
        "task": {"name": "discharge-summary", "max_tokens": 256, "temperature": 0.0, "deterministic": True},
        "completed": 2,
        "failed": 0,
        "scores": {"rouge1": 0.4, "rouge2": 0.1, "rougeL": 0.25, "section_coverage": 0.5, **scores},
        "latency": {},
        "items": [],
    }
    for key, value in changes.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) else value
    path = results.save(Store(), doc)
    assert path is not None
    return path


def channel(home: Path) -> bytes | None:
    path = home / "channels" / "tiny" / "production.json"
    return path.read_bytes() if path.exists() else None


def audit_events(home: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in audit.log_files(home / "audit") for line in f.read_text().splitlines()]


def refused(cli: Cli, home: Path, words: str, *args: Any) -> None:
    before = channel(home)
    res = cli("promote", *args)
    assert res.exit_code == 1 and words in res.stderr, (words, res)
    assert_one_error(res.stderr)
    assert channel(home) == before, "a refused promotion moved the channel"
    last = audit_events(home)[-1]
    assert last["event"] == "channel.promote-refused" and words in last["refusal"]
    assert last["gates"]["eval"]["passed"] is False


GATE = ("--to", "production", "--require-eval")


def test_gate_refuses_a_missing_eval(cli: Cli, home: Path, tiny_pair: dict[str, str], tmp_path: Path) -> None:
    refused(cli, home, "has no stored eval", "tiny:1", *GATE, "latest", "--min", "rougeL=0.2")
    refused(cli, home, "does not exist", "tiny:1", *GATE, tmp_path / "no-eval.json", "--min", "rougeL=0.2")


def test_gate_refuses_an_eval_of_another_bundle_or_dataset(
    cli: Cli, home: Path, tiny_pair: dict[str, str], small: Path
) -> None:
    other = stored_eval("2", tiny_pair["2"], {})
    refused(cli, home, "measured another bundle", "tiny:1", *GATE, other, "--min", "rougeL=0.2")
    stored_eval("1", tiny_pair["1"], {})
    refused(cli, home, "no stored eval on that dataset", "tiny:1", *GATE, "latest", "--eval-dataset", small)


def test_gate_refuses_scores_below_min_and_a_failed_eval(cli: Cli, home: Path, tiny_pair: dict[str, str]) -> None:
    low = stored_eval("1", tiny_pair["1"], {"rougeL": 0.18})
    refused(cli, home, "rougeL 0.1800 < 0.2", "tiny:1", *GATE, low, "--min", "rougeL=0.20")
    partial = stored_eval("1", tiny_pair["1"], {}, failed=1)
    refused(cli, home, "failed", "tiny:1", *GATE, partial, "--min", "rougeL=0.20")
    res = cli("promote", "tiny:1", *GATE, "latest", "--min", "bleu=0.2")
    assert res.exit_code == 2 and "Invalid --min" in res.stderr


def test_gate_passes_and_is_recorded(cli: Cli, home: Path, tiny_pair: dict[str, str]) -> None:
    stored_eval("1", tiny_pair["1"], {"rougeL": 0.18})
    good = stored_eval("1", tiny_pair["1"], {"rougeL": 0.25})  # the newer one is "latest"
    res = cli("promote", "tiny:1", *GATE, "latest", "--min", "rougeL=0.20", "--json")
    assert res.exit_code == 0, res
    gate = res.json()["gates"]["eval"]
    assert gate["passed"] and gate["file"] == str(good) and gate["scores"]["rougeL"] == 0.25
    assert json.loads(channel(home) or b"{}")["version"] == "1"
    (entry,) = cli("history", "tiny", "--json").json()
    assert entry["gates"]["eval"]["min"] == {"rougeL": 0.2}
    moved = [e for e in audit_events(home) if e["event"] == "channel.promote"]
    assert moved[-1]["gates"]["eval"]["passed"] and audit.verify(home=home).ok
    assert "latest eval of tiny:1" in cli("history", "tiny").stderr


def test_gate_refuses_a_drop_against_the_channels_version(cli: Cli, home: Path, tiny_pair: dict[str, str]) -> None:
    stored_eval("1", tiny_pair["1"], {"rougeL": 0.30})
    assert cli("promote", "tiny:1", *GATE, "latest", "--min", "rougeL=0.2").exit_code == 0
    worse = stored_eval("2", tiny_pair["2"], {"rougeL": 0.27})
    drop = ("--min", "rougeL=0.2", "--max-drop", "rougeL=0.02")
    refused(cli, home, "drops more than --max-drop", "tiny:2", *GATE, worse, *drop)
    # An eval on other rows cannot be compared: refused too, with its own message.
    other_rows = stored_eval("2", tiny_pair["2"], {"rougeL": 0.30}, dataset={"ids": ["a"]})
    refused(cli, home, "has no eval with the same dataset rows", "tiny:2", *GATE, other_rows, *drop)
    close = stored_eval("2", tiny_pair["2"], {"rougeL": 0.28})  # 0.02 below: not more than allowed
    res = cli("promote", "tiny:2", *GATE, close, *drop, "--json")
    assert res.exit_code == 0, res
    assert res.json()["gates"]["eval"]["baseline"]["ref"] == "tiny:1"
    assert json.loads(channel(home) or b"{}")["version"] == "2"
