"""Eval documents: built from answers, kept under ``$MLSERVE_HOME/evals/NAME/VERSION/TIME.json``, found again.

A document names the bundle (name, version, manifest digest) and the dataset (file sha256 and
the row ids scored), so a promotion gate can tell whether it measured this very bundle on
the data it expects. It holds scores and hashes, never a note's text.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlserve import config
from mlserve.bench.metrics import summarize
from mlserve.bundles.store import Store
from mlserve.errors import InvalidInputError, NotFoundError
from mlserve.eval.dataset import PairSet
from mlserve.eval.runner import Answer, Plan
from mlserve.eval.scoring import mean_scores, score_note
from mlserve.fsutil import atomic_write_bytes
from mlserve.names import NAME_RE, VERSION_RE

KIND = "mlserve-eval"


@dataclass(frozen=True)
class Subject:
    """What was evaluated: the model id sent, and the bundle behind it when known."""

    target: str
    model: str
    name: str | None
    version: str | None
    digest: str | None


def build(
    subject: Subject, pairs: PairSet, task: str, plan: Plan, answers: list[Answer], duration: float, env: dict[str, Any]
) -> dict[str, Any]:
    """The eval document: per-item scores, their means over completed items, and the bench's latency block."""
    items: list[dict[str, Any]] = []
    scores = []
    for a in answers:
        item: dict[str, Any] = {"id": a.pair.id}
        if a.text is None:
            item["error"] = a.result.error
        else:
            score = score_note(a.text, a.pair.reference, a.pair.dialogue)
            scores.append(score)
            item.update(score.as_dict())
            item.update(
                completion_tokens=a.result.output_tokens,
                finish_reason=a.finish_reason,
                e2el_ms=round(a.result.e2el * 1000, 3),
                output_sha256=a.output_sha256,
            )
        items.append(item)
    latency = summarize([a.result for a in answers], duration, max_concurrency=plan.concurrency, request_rate=None)
    failed = [i for i in items if "error" in i]
    return {
        "kind": KIND,
        "schema": 1,
        "time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "user": config.current_user(),
        "target": subject.target,
        "model": subject.model,
        "name": subject.name,
        "version": subject.version,
        "digest": subject.digest,
        "dataset": {"file": pairs.path.name, "sha256": pairs.sha256, "rows": pairs.total_rows, "ids": pairs.ids},
        "task": {
            "name": task,
            "max_tokens": plan.max_tokens,
            "temperature": 0.0,
            "deterministic": plan.deterministic,
        },
        "completed": len(items) - len(failed),
        "failed": len(failed),
        "errors": sorted({str(i["error"]) for i in failed})[:5],
        "scores": mean_scores(scores),
        "latency": latency,
        "env": env,
        "items": items,
    }


def evals_dir(store: Store, name: str, version: str) -> Path:
    """``$MLSERVE_HOME/evals/NAME/VERSION``."""
    return store.root / "evals" / name / version


def save(store: Store, doc: dict[str, Any]) -> Path | None:
    """Write ``doc`` next to its bundle's other evals; None when it names no storable bundle (a foreign server)."""
    name, version = doc.get("name"), doc.get("version")
    if not (isinstance(name, str) and NAME_RE.fullmatch(name) and isinstance(version, str)):
        return None
    if not VERSION_RE.fullmatch(version) or not doc.get("digest"):
        return None
    stamp = str(doc["time"]).replace(":", "-")  # sorts in time order and is a valid file name everywhere
    path = evals_dir(store, name, version) / f"{stamp}.json"
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode(), store.root / "tmp")
    return path


def load(path: Path) -> dict[str, Any]:
    """An eval document from a file; InvalidInputError when it is not one."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"Eval file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidInputError(f"Eval file {path} is not readable JSON: {exc}.") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND or not isinstance(doc.get("scores"), dict):
        raise InvalidInputError(
            f"{path} is not an mlserve eval document.", "Write one with `mlserve eval REF --dataset FILE --json`."
        )
    if not isinstance(doc.get("dataset"), dict) or not isinstance(doc.get("task"), dict):
        raise InvalidInputError(f"Eval file {path} lacks its dataset or task.")
    return doc


def history(store: Store, name: str, version: str) -> list[Path]:
    """Every stored eval of NAME:VERSION, oldest first."""
    folder = evals_dir(store, name, version)
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def latest(
    store: Store, name: str, version: str, match: Callable[[dict[str, Any]], bool] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable eval of NAME:VERSION (that ``match`` accepts), with its path."""
    for path in reversed(history(store, name, version)):
        try:
            doc = load(path)
        except (InvalidInputError, NotFoundError):
            continue  # a damaged file is skipped here; passed as FILE to a gate it is an error
        if match is None or match(doc):
            return path, doc
    return None


def same_setup(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two evals scored the same rows of the same file with the same task and token budget."""
    da, db, ta, tb = a["dataset"], b["dataset"], a["task"], b["task"]
    return bool(
        da.get("sha256") == db.get("sha256")
        and da.get("ids") == db.get("ids")
        and ta.get("name") == tb.get("name")
        and ta.get("max_tokens") == tb.get("max_tokens")
    )


def summary(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """What ``show`` and ``history`` print of an eval."""
    data, lat = doc["dataset"], doc.get("latency") or {}
    return {
        "time": doc.get("time"),
        "file": str(path),
        "dataset": data.get("file"),
        "dataset_sha256": data.get("sha256"),
        "rows": len(data.get("ids") or []),
        "task": doc["task"].get("name"),
        "failed": doc.get("failed"),
        "scores": doc["scores"],
        "median_e2el_ms": lat.get("median_e2el_ms"),
        "p99_e2el_ms": lat.get("p99_e2el_ms"),
    }


def one_line(doc: dict[str, Any]) -> str:
    """``ROUGE-1 0.31 ROUGE-2 0.09 ROUGE-L 0.17 sections 0.62 (dialogue-to-note.jsonl, 20 rows, TIME)``."""
    s = doc["scores"]
    rows = len(doc["dataset"].get("ids") or [])
    return (
        f"ROUGE-1 {s.get('rouge1', 0):.3f} ROUGE-2 {s.get('rouge2', 0):.3f} ROUGE-L {s.get('rougeL', 0):.3f} "
        f"sections {s.get('section_coverage', 0):.2f} ({doc['dataset'].get('file')}, {rows} rows, {doc.get('time')})"
    )
