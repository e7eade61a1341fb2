"""The quality gate of ``promote --require-eval FILE|latest --min KEY=X [--max-drop KEY=X]``.

It refuses (``EvalRefused``, exit 1, the channel untouched) when the eval is missing, measured
another bundle or dataset, had failed requests, scores below a ``--min`` bound, or drops more
than ``--max-drop`` below the latest eval, with the same setup, of the version the channel
holds now. What it checked is returned (and kept in the history entry and the audit record);
a refusal carries the same record.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlserve.bundles.store import Bundle, Store
from mlserve.errors import CheckFailed, UsageError
from mlserve.eval import results
from mlserve.eval.scoring import SCORE_KEYS
from mlserve.fsutil import sha256_file

LATEST = "latest"
_BOUND = re.compile(r"([A-Za-z0-9_]+)=([0-9]*\.?[0-9]+)")


class EvalRefused(CheckFailed):
    """The quality gate refused the promotion; ``record`` says what it checked."""

    def __init__(self, message: str, hint: str | None, record: dict[str, Any]) -> None:
        super().__init__(message, hint)
        self.record = record


def parse_bounds(items: Sequence[str], flag: str) -> dict[str, float]:
    """``["rougeL=0.20", "rouge1=0.3,rouge2=0.1"]`` -> {key: bound}; keys are the eval's score keys."""
    bounds: dict[str, float] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            match = _BOUND.fullmatch(part)
            if not match or match.group(1) not in SCORE_KEYS:
                keys = ", ".join(SCORE_KEYS)
                raise UsageError(f"Invalid {flag} {part!r}.", f"Write KEY=X with KEY one of {keys}, e.g. rougeL=0.20.")
            bounds[match.group(1)] = float(match.group(2))
    return bounds


def eval_gate(
    store: Store,
    source: str,
    channel: str,
    minimum: dict[str, float],
    max_drop: dict[str, float],
    dataset: Path | None = None,
) -> Callable[[Bundle], dict[str, Any]]:
    """A promotion gate on an eval FILE (or the ``latest`` stored eval of the version promoted)."""
    want_sha = sha256_file(dataset) if dataset is not None else None

    def gate(bundle: Bundle) -> dict[str, Any]:
        record: dict[str, Any] = {"require": source, "min": minimum, "max_drop": max_drop, "passed": False}

        def refuse(why: str, hint: str) -> EvalRefused:
            record["refused"] = why
            return EvalRefused(f"Not promoting {bundle.ref}: {why}.", hint, {"eval": record})

        rerun = f"Run `mlserve eval {bundle.ref} --dataset FILE.jsonl` and promote again."
        path, doc = _find(store, bundle, source, want_sha, refuse, rerun)
        record.update(file=str(path), digest=doc.get("digest"), dataset_sha256=doc["dataset"].get("sha256"))
        record.update(rows=len(doc["dataset"].get("ids") or []), task=doc["task"].get("name"), scores=doc["scores"])
        if str(doc.get("digest")) != bundle.digest:
            raise refuse(f"eval {path} measured another bundle ({str(doc.get('digest'))[:19]})", rerun)
        if want_sha is not None and doc["dataset"].get("sha256") != want_sha:
            raise refuse(f"eval {path} ran on another dataset than {dataset}", rerun)
        if doc.get("failed"):
            raise refuse(f"{doc['failed']} request(s) of eval {path} failed, so its scores are incomplete", rerun)
        low = [f"{k} {_score(doc, k):.4f} < {v:g}" for k, v in minimum.items() if _score(doc, k) < v]
        if low:
            raise refuse(f"its eval scores below the bound ({'; '.join(low)})", "Improve the model, or lower --min.")
        base = _baseline(store, bundle, channel, doc, refuse) if max_drop else None
        if base is not None:
            held, base_path, base_doc = base
            record["baseline"] = {"ref": held, "file": str(base_path), "scores": base_doc["scores"]}
            # Rounded: scores are kept to 4 digits, and 0.25 - 0.23 must not count as more than 0.02.
            drops = {k: round(_score(base_doc, k) - _score(doc, k), 6) for k in max_drop}
            over = [f"{k} {_score(doc, k):.4f} is {d:.4f} below {held}'s" for k, d in drops.items() if d > max_drop[k]]
            if over:
                why = f"its eval drops more than --max-drop allows ({'; '.join(over)})"
                raise refuse(why, "Improve the model first, or compare with --max-drop on a fresh eval of both.")
        record["passed"] = True
        return {"eval": record}

    return gate


def _score(doc: dict[str, Any], key: str) -> float:
    value = doc["scores"].get(key)
    return float(value) if isinstance(value, (int, float)) else float("-inf")


def _find(
    store: Store,
    bundle: Bundle,
    source: str,
    want_sha: str | None,
    refuse: Callable[[str, str], EvalRefused],
    rerun: str,
) -> tuple[Path, dict[str, Any]]:
    if source != LATEST:
        path = Path(source)
        if not path.is_file():
            raise refuse(f"eval file {path} does not exist", rerun)
        return path, results.load(path)
    found = results.latest(
        store, bundle.name, bundle.version, lambda d: want_sha is None or d["dataset"].get("sha256") == want_sha
    )
    if found is None:
        where = " on that dataset" if want_sha is not None else ""
        raise refuse(f"it has no stored eval{where}", rerun)
    return found


def _baseline(
    store: Store, bundle: Bundle, channel: str, doc: dict[str, Any], refuse: Callable[[str, str], EvalRefused]
) -> tuple[str, Path, dict[str, Any]] | None:
    """The latest eval, with the same setup, of the version the channel holds now (None for an empty channel)."""
    pointer = store.channel_pointer(bundle.name, channel)
    if pointer is None:
        return None  # a first promotion has nothing to drop from
    held = f"{bundle.name}:{pointer['version']}"
    found = results.latest(
        store,
        bundle.name,
        str(pointer["version"]),
        lambda d: d.get("digest") == pointer["digest"] and not d.get("failed") and results.same_setup(d, doc),
    )
    if found is None:
        raise refuse(
            f"{held}, which {bundle.name}@{channel} holds now, has no eval with the same dataset rows, task and "
            "max_tokens to compare with",
            f"Run `mlserve eval {held}` with the same --dataset, --limit and --max-tokens, then promote again.",
        )
    return held, *found
