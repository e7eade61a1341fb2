"""What a benchmark sends: synthetic prompts of about N tokens, or chat requests built from a JSONL dataset."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlserve.errors import InvalidInputError, NotFoundError

DEFAULT_SYSTEM = (
    "You are a clinical documentation assistant. Summarise the following doctor-patient conversation "
    "as a concise clinical note with the sections Chief Complaint, History of Present Illness, "
    "Assessment and Plan. Use only facts stated in the conversation."
)
# Common English words that most tokenizers encode as one token each (with their leading space).
_WORDS = (
    "the of and to in is was for on that with as by at from his her patient pain blood heart day week "
    "year time left right back chest head test care plan good well new high low dose daily more less "
    "about after before while since when also some any each other over under first last long short"
).split()


@dataclass(frozen=True)
class Workload:
    """Request bodies, ready to send, and the route they go to."""

    route: str  # "/v1/completions" or "/v1/chat/completions"
    bodies: list[bytes]
    description: str


def synthetic_prompt(rng: random.Random, n_tokens: int, index: int) -> str:
    """About ``n_tokens`` tokens of words; the leading index keeps prompts distinct (no prefix-cache hits)."""
    words = [f"{index}:"] + [rng.choice(_WORDS) for _ in range(max(0, n_tokens - 2))]
    return " ".join(words)


def _body(model: str, output_len: int, temperature: float | None, **payload: Any) -> bytes:
    body: dict[str, Any] = {"model": model, **payload, "max_tokens": output_len, "stream": True}
    body["stream_options"] = {"include_usage": True}
    if temperature is not None:
        body["temperature"] = temperature
    return json.dumps(body, separators=(",", ":")).encode()


def synthetic(
    model: str, num_prompts: int, input_len: int, output_len: int, seed: int = 0, temperature: float | None = None
) -> Workload:
    """Completions requests with random-word prompts of roughly ``input_len`` tokens."""
    rng = random.Random(seed)
    bodies = [
        _body(model, output_len, temperature, prompt=synthetic_prompt(rng, input_len, i)) for i in range(num_prompts)
    ]
    return Workload("/v1/completions", bodies, f"synthetic ~{input_len} in / {output_len} out tokens")


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
            if not isinstance(row, dict) or not any(k in row for k in ("dialogue", "prompt", "messages")):
                raise InvalidInputError(
                    f"{path} line {n} has no 'dialogue', 'prompt' or 'messages' field.",
                    "Each line must be a JSON object with one of those fields.",
                )
            rows.append(row)
    if not rows:
        raise InvalidInputError(f"Dataset {path} holds no rows.")
    return rows


def _messages(row: dict[str, Any], system: str) -> list[dict[str, str]]:
    if "messages" in row:
        return list(row["messages"])
    if "dialogue" in row:
        return [{"role": "system", "content": system}, {"role": "user", "content": str(row["dialogue"])}]
    return [{"role": "user", "content": str(row["prompt"])}]


def dataset(
    model: str,
    path: Path,
    num_prompts: int,
    output_len: int,
    system: str | None = None,
    temperature: float | None = None,
) -> Workload:
    """Chat requests from a JSONL dataset, cycling through its rows; dialogues get a summarisation prompt."""
    rows = read_dataset(path)
    sys_prompt = system or DEFAULT_SYSTEM
    bodies = [
        _body(model, output_len, temperature, messages=_messages(rows[i % len(rows)], sys_prompt))
        for i in range(num_prompts)
    ]
    return Workload("/v1/chat/completions", bodies, f"{path.name} ({len(rows)} rows), {output_len} out tokens max")
