"""JSONL datasets: the one reader ``bench --dataset`` and ``eval`` share, and dialogue -> note pairs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlserve.errors import InvalidInputError, NotFoundError
from mlserve.fsutil import sha256_file

PROMPT_FIELDS = ("dialogue", "prompt", "messages")


def read_dataset(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; each needs "dialogue", "prompt" or "messages"."""
    if not path.is_file():
        raise NotFoundError(f"Dataset {path} does not exist.", "Give a JSONL file with one JSON object per line.")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise InvalidInputError(f"{path} line {n} is not valid JSON.") from None
            if not isinstance(row, dict) or not any(k in row for k in PROMPT_FIELDS):
                raise InvalidInputError(
                    f"{path} line {n} has no 'dialogue', 'prompt' or 'messages' field.",
                    "Each line must be a JSON object with one of those fields.",
                )
            rows.append(row)
    if not rows:
        raise InvalidInputError(f"Dataset {path} holds no rows.")
    return rows


@dataclass(frozen=True)
class Pair:
    """One dialogue and the reference note a model's note is scored against."""

    id: str
    dialogue: str
    reference: str


@dataclass(frozen=True)
class PairSet:
    """The pairs an eval scores and what identifies them: the file's sha256 and the row ids taken."""

    path: Path
    sha256: str
    total_rows: int
    pairs: tuple[Pair, ...]

    @property
    def ids(self) -> list[str]:
        """The ids of the pairs, in order."""
        return [p.id for p in self.pairs]


def read_pairs(path: Path, limit: int | None = None, split: str | None = None) -> PairSet:
    """The first ``limit`` rows (all when None) as dialogue -> note pairs; each row needs both strings.

    ``split`` keeps only the rows whose id starts with ``SPLIT/`` (``valid/D2N068``), before the limit.
    """
    rows = read_dataset(path)
    chosen = rows
    if split is not None:
        chosen = [row for row in rows if str(row.get("id", "")).startswith(f"{split}/")]
        if not chosen:
            splits = sorted({str(r.get("id", "")).split("/")[0] for r in rows if "/" in str(r.get("id", ""))})
            raise InvalidInputError(
                f"{path} has no row of split {split!r}.",
                f"Its splits: {', '.join(splits)}." if splits else "Its row ids carry no SPLIT/ prefix.",
            )
    chosen = chosen if limit is None else chosen[:limit]
    pairs = []
    for n, row in enumerate(chosen, 1):
        dialogue, note = row.get("dialogue"), row.get("note")
        if not isinstance(dialogue, str) or not isinstance(note, str) or not dialogue.strip() or not note.strip():
            raise InvalidInputError(
                f"{path} row {n} has no non-empty 'dialogue' and 'note' strings.",
                "An eval dataset pairs each dialogue with its reference note (the format of benchmarks/data/).",
            )
        pairs.append(Pair(str(row.get("id", n)), dialogue, note))
    return PairSet(path, sha256_file(path), len(rows), tuple(pairs))
