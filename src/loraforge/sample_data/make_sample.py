"""Make the demo's bundled sample from the E2E NLG Challenge data (CC BY-SA 4.0, Novikova et al. 2017).

    python src/loraforge/sample_data/make_sample.py /work/shared/data/e2e

Reads `trainset.csv` and `devset.csv` (header `mr,ref`) from the given folder and writes, next to this script:

- `e2e_demo.jsonl`: the first reference of each of the first 300 distinct MRs of `trainset.csv`, in file order,
  as instruction records.
- `e2e_demo_prompts.jsonl`: 4 distinct MRs of `devset.csv`, none of them in the training sample, evenly spaced
  through the dev set's distinct MRs (it is sorted by restaurant name, so the first 4 would all be "Alimentum"),
  with all of their dev references, for the demo's before/after comparison.

Runs of whitespace inside a text are collapsed to one space; nothing else is changed.
Deterministic: no randomness, same input bytes give the same output bytes.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

INSTRUCTION = "Write a short description of this restaurant that uses every fact in the data."
N_TRAIN = 300
N_PROMPTS = 4


def first_refs(csv_path: Path) -> dict[str, list[str]]:
    """Distinct MRs in file order -> all their references, in file order."""
    refs: dict[str, list[str]] = {}
    with csv_path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            # Runs of spaces are collapsed ("...rating.  Prices" -> "...rating. Prices"); nothing else is changed.
            refs.setdefault(" ".join(row["mr"].split()), []).append(" ".join(row["ref"].split()))
    return refs


def write_jsonl(path: Path, records: list[dict[str, object]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("e2e_dir", type=Path, help="folder with the official trainset.csv and devset.csv")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="where to write (default: here)")
    args = parser.parse_args()

    train = first_refs(args.e2e_dir / "trainset.csv")
    train_mrs = list(train)[:N_TRAIN]
    records = [{"instruction": INSTRUCTION, "input": mr, "output": train[mr][0]} for mr in train_mrs]
    write_jsonl(args.out / "e2e_demo.jsonl", records)

    dev = first_refs(args.e2e_dir / "devset.csv")
    held_out = [mr for mr in dev if mr not in set(train_mrs)]
    step = len(held_out) // N_PROMPTS
    picks = [held_out[step // 2 + i * step] for i in range(N_PROMPTS)]
    prompts = [{"instruction": INSTRUCTION, "input": mr, "references": dev[mr]} for mr in picks]
    write_jsonl(args.out / "e2e_demo_prompts.jsonl", prompts)
    print(f"wrote {len(records)} training records and {len(prompts)} held-out prompts to {args.out}")


if __name__ == "__main__":
    main()
