"""Scores of one generated note against its reference: ROUGE F1, section coverage, length ratio.

ROUGE comes from ``rouge-score`` (the only module that imports it), with Porter stemming, as
the ACI-Bench paper reports it: ``rougeL`` is the LCS over the whole note, ``rougeLsum`` the
summary-level LCS over its lines. Section coverage is the share of the reference note's section
headings (lines in capitals, such as ``CHIEF COMPLAINT`` or ``HPI:``) that the generated note
names at the start of one of its lines, however it is cased or marked up. Transcript overlap is
the share of the note's word pairs found in the dialogue (ROUGE-2 precision against it): near 1,
the "note" repeats the transcript, which scores about as well as copying it (ROUGE-1 ~ 33).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SCORE_KEYS = (*ROUGE_KEYS, "section_coverage", "length_ratio", "transcript_overlap")
_HEADING = re.compile(r"[A-Z][A-Z &/()-]{1,48}:?")  # capitals only: "VITALS", "CC:", no digits ("BP: 120/80")
_MARKUP = re.compile(r"[^a-z0-9&/ ]+")
# Abbreviations and variants the reference notes use for the same section.
_ALIASES = {
    "cc": "chief complaint",
    "hpi": "history of present illness",
    "physical examination": "physical exam",
    "exam": "physical exam",
    "vitals reviewed": "vitals",
    "past history": "past medical history",
    "medical history": "past medical history",
    "current medications": "medications",
}


@dataclass(frozen=True)
class NoteScore:
    """One note's scores (F1 and shares in 0..1; ``length_ratio`` = generated words / reference words)."""

    rouge1: float
    rouge2: float
    rougeL: float  # noqa: N815 - rouge-score's own key names, so results read like ACI-Bench's tables
    rougeLsum: float  # noqa: N815
    section_coverage: float
    length_ratio: float
    transcript_overlap: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """The scores by key, rounded to 4 digits."""
        return {k: round(v, 4) for k, v in asdict(self).items()}


@lru_cache(maxsize=2)
def _scorer(keys: tuple[str, ...] = ROUGE_KEYS) -> Any:
    from rouge_score import rouge_scorer  # a second or so to import (nltk): only when scoring

    return rouge_scorer.RougeScorer(list(keys), use_stemmer=True)


def _clean(line: str) -> str:
    """Lower case, '&' spelled out, markup and punctuation gone, spaces collapsed."""
    return " ".join(_MARKUP.sub(" ", line.lower().replace("&", " and ")).split())


def sections(note: str) -> list[str]:
    """The section headings of a reference note, normalised (``CC:`` -> ``chief complaint``), in order."""
    found: list[str] = []
    for line in note.splitlines():
        line = line.strip()
        if _HEADING.fullmatch(line) and sum(c.isalpha() for c in line) >= 2:
            name = _ALIASES.get(_clean(line), _clean(line))
            if name and name not in found:
                found.append(name)
    return found


def section_coverage(generated: str, reference: str) -> float:
    """The share of the reference's headings that begin a line of the generated note (1.0 when it has none)."""
    wanted = sections(reference)
    if not wanted:
        return 1.0
    lines = [line for line in map(_clean, generated.splitlines()) if line]
    starts = list(lines)
    for short, full in _ALIASES.items():
        starts += [full + line[len(short) :] for line in lines if line == short or line.startswith(short + " ")]
    hit = sum(1 for name in wanted if any(line == name or line.startswith(name + " ") for line in starts))
    return hit / len(wanted)


def score_note(generated: str, reference: str, dialogue: str = "") -> NoteScore:
    """ROUGE-1/2/L/Lsum F1, section coverage and length ratio against ``reference``; overlap with ``dialogue``."""
    rouge = _scorer().score(reference, generated)
    copied = _scorer(("rouge2",)).score(dialogue, generated)["rouge2"].precision if dialogue else 0.0
    ref_words = len(reference.split())
    return NoteScore(
        rouge1=rouge["rouge1"].fmeasure,
        rouge2=rouge["rouge2"].fmeasure,
        rougeL=rouge["rougeL"].fmeasure,
        rougeLsum=rouge["rougeLsum"].fmeasure,
        section_coverage=section_coverage(generated, reference),
        length_ratio=len(generated.split()) / ref_words if ref_words else 0.0,
        transcript_overlap=copied,
    )


def mean_scores(scores: Sequence[NoteScore]) -> dict[str, float]:
    """The mean of each score over the notes (every key 0.0 when there are none)."""
    return {k: round(statistics.fmean([getattr(s, k) for s in scores]), 4) if scores else 0.0 for k in SCORE_KEYS}
