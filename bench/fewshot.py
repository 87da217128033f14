"""Few-shot LoRA against in-context learning: 32 examples, the same 32 both ways, three seeds (issue 14's row).

    python bench/fewshot.py                     # SST-2, seeds 0 1 2, the whole dev split (872 sentences)
    python bench/fewshot.py --seeds 0 --max-examples 100   # a quick look

For each seed: a seeded draw of 32 training sentences stratified by label (`loraforge.data.split.sample_few_shot`),
written to OUT/sst2_32_seed{S}.jsonl; `loraforge train` on them (examples/sst2_fewshot32.yaml's settings); then one
`loraforge eval` scoring, on the dev split, the base zero-shot, the base with the same 32 in context (`--few-shot 32
--few-shot-data` that file) and the adapter. Every model answers by label-word scoring (the likelier label after the
prompt), so no answer is invalid. Each command is timed; OUT/summary.json holds the per-seed accuracies, the means and
spreads, and the commands, for bench/quality_table.py; the table is printed.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from loraforge.data.split import sample_few_shot

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def draw(seed: int, n: int, out: Path) -> Path:
    with open(DATA / "sst2" / "train.tsv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    path = out / f"sst2_{n}_seed{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sample_few_shot(rows, n, seed, label_key="label")))
    return path


def timed(command: list[str], log: list[dict]) -> None:
    start = time.perf_counter()
    subprocess.run(command, check=True)
    log.append({"command": " ".join(command), "seconds": round(time.perf_counter() - start, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--max-examples", type=int, default=0, help="dev sentences scored (0 = all 872)")
    parser.add_argument("--output", default="runs/quality/sst2_fewshot")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    seeds = {}
    for seed in args.seeds:
        shots = draw(seed, args.shots, out)
        adapter, report = out / f"lora_seed{seed}", out / f"report_seed{seed}"
        log: list[dict] = []
        timed(["loraforge", "train", "examples/sst2_fewshot32.yaml", "--data", str(shots), "--max-examples", "0",
               "--val-data", "", "--seed", str(seed), "--output", str(adapter), "--overwrite"], log)
        timed(["loraforge", "eval", "--recipe", "sst2", "--data", str(DATA / "sst2" / "dev.tsv"),
               "--max-examples", str(args.max_examples), "--answer", "label-words", "--adapter", str(adapter),
               "--few-shot", str(args.shots), "--few-shot-data", str(shots), "--seed", str(seed),
               "--output", str(report)], log)
        models = json.loads((report / "results.json").read_text())["models"]
        acc = {("lora" if m["adapter"] else "in-context" if m["few_shot"] else "zero-shot"):
               100 * m["metrics"]["accuracy"] for m in models}
        seeds[seed] = {**acc, "minutes": round(sum(c["seconds"] for c in log) / 60, 1), "commands": log}
    mean = {k: statistics.mean(s[k] for s in seeds.values()) for k in ("zero-shot", "in-context", "lora")}
    spread = {k: statistics.stdev(s[k] for s in seeds.values()) if len(seeds) > 1 else 0.0 for k in mean}
    summary = {"shots": args.shots, "max_examples": args.max_examples, "seeds": seeds, "mean": mean, "sd": spread,
               "lora_minus_in_context": mean["lora"] - mean["in-context"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("| seed | zero-shot | 32 in context | LoRA on the 32 | minutes (train + eval) |")
    print("|---|---|---|---|---|")
    for seed, s in seeds.items():
        print(f"| {seed} | {s['zero-shot']:.1f} | {s['in-context']:.1f} | {s['lora']:.1f} | {s['minutes']} |")
    print(f"| mean (sd) | {mean['zero-shot']:.1f} ({spread['zero-shot']:.1f}) | {mean['in-context']:.1f} "
          f"({spread['in-context']:.1f}) | **{mean['lora']:.1f}** ({spread['lora']:.1f}) | |")
    print(f"LoRA - in context: {summary['lora_minus_in_context']:+.1f} points", file=sys.stderr)


if __name__ == "__main__":
    main()
