"""ACI-Bench's floor, measured with `mlserve eval`'s own scorer: the transcript itself, copied as the note.

    python benchmarks/eval_copy_baseline.py [--dataset FILE.jsonl] [--limit 20] [--split valid]

Prints the same score means `mlserve eval` reports (ROUGE F1 with stemming, section coverage,
length ratio), so a model's table can sit beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlserve.eval.dataset import read_pairs
from mlserve.eval.scoring import mean_scores, score_note

DATA = Path(__file__).resolve().parent / "data" / "dialogue-to-note.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--split", default=None, help="Only the rows whose id starts with SPLIT/ (e.g. valid).")
    args = parser.parse_args()
    pairs = read_pairs(args.dataset, args.limit, args.split)
    means = mean_scores([score_note(p.dialogue, p.reference, p.dialogue) for p in pairs.pairs])
    print(f"copy the transcript, {len(pairs.pairs)} rows of {args.dataset.name}:")
    print("| ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | sections | length ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    cells = [f"{means[k] * 100:.1f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "section_coverage")]
    print("| " + " | ".join(cells) + f" | {means['length_ratio']:.2f} |")


if __name__ == "__main__":
    main()
