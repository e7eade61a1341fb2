"""How the batching scheduler trades a newcomer's prompt against running streams, and whether it drafts."""

from __future__ import annotations

from dataclasses import dataclass

# Target milliseconds for a step while streams run: the gap each stream sees between tokens
# when a newcomer's prompt is being processed beside them (see prefill.py).
MAX_STEP_MS = 100.0
DRAFT_MAX = 8  # most drafted tokens a sequence verifies in one step


@dataclass(frozen=True)
class Tuning:
    """Per-model scheduling settings (``serve --max-step-ms``, ``--speculate/--no-speculate``, ``--draft-max``)."""

    max_step_ms: float = MAX_STEP_MS
    speculate: bool = True
    draft_max: int = DRAFT_MAX
