"""What a benchmark sends: synthetic prompts of about N tokens, or chat requests built from a JSONL dataset."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlserve.bench.apis import APIS
from mlserve.eval.dataset import read_dataset

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

    route: str  # e.g. "/v1/completions", "/v1/chat/completions", "/api/chat", "/v1/messages"
    bodies: list[bytes]
    description: str
    # Dataset runs: each level's own rows (fresh dialogues, no prompt cached by an earlier level);
    # empty: every level sends ``bodies`` with a per-level prefix.
    per_level: tuple[list[bytes], ...] = ()


def synthetic_prompt(rng: random.Random, n_tokens: int, index: int) -> str:
    """About ``n_tokens`` tokens of words; the leading index keeps prompts distinct (no prefix-cache hits)."""
    words = [f"{index}:"] + [rng.choice(_WORDS) for _ in range(max(0, n_tokens - 2))]
    return " ".join(words)


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def synthetic(
    model: str,
    num_prompts: int,
    input_len: int,
    output_len: int,
    seed: int = 0,
    temperature: float | None = None,
    api: str = "openai",
) -> Workload:
    """Raw-prompt requests (no chat template; Anthropic: one user turn) of roughly ``input_len`` tokens."""
    proto = APIS[api]
    rng = random.Random(seed)
    bodies = [
        _encode(proto.prompt_body(model, synthetic_prompt(rng, input_len, i), output_len, temperature))
        for i in range(num_prompts)
    ]
    return Workload(proto.prompt_route, bodies, f"synthetic ~{input_len} in / {output_len} out tokens")


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
    api: str = "openai",
    levels: int = 1,
) -> Workload:
    """Chat requests from a JSONL dataset; dialogues get a summarisation prompt.

    Level i sends rows ``i*num_prompts`` onward, so each level gets fresh dialogues while the
    dataset lasts; past that, every level sends the first rows (the runner prefixes them per level).
    """
    proto = APIS[api]
    rows = read_dataset(path)
    sys_prompt = system or DEFAULT_SYSTEM

    def body(i: int) -> bytes:
        return _encode(proto.chat_body(model, _messages(rows[i % len(rows)], sys_prompt), output_len, temperature))

    fresh = max(1, levels) * num_prompts <= len(rows)
    per_level = tuple([body(lv * num_prompts + i) for i in range(num_prompts)] for lv in range(levels)) if fresh else ()
    about = f"{path.name} ({len(rows)} rows{', fresh rows per level' if fresh else ''}), {output_len} out tokens max"
    return Workload(proto.chat_route, [body(i) for i in range(num_prompts)], about, per_level)
