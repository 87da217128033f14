"""Few-shot LoRA against in-context learning: 32 examples, the same 32 both ways, three seeds (issue 14's rows).

    python bench/fewshot.py                     # SST-2, seeds 0 1 2, the whole dev split (872 sentences)
    python bench/fewshot.py --task conll2003    # CoNLL-2003 NER as generation, the 200-sentence dev sample
    python bench/fewshot.py --seeds 0 --max-examples 100   # a quick look
    python bench/fewshot.py --task conll2003 --lr 3e-4 --output runs/fewshot/lr3e-4   # other flags go to train

For each seed: a seeded draw of 32 training records (SST-2: stratified by label, `loraforge.data.split.sample_few_shot`;
CoNLL: 32 sentences, uniform), written to OUT/{task}_32_seed{S}.{suffix}; `loraforge train` on them (the task's
examples/*_fewshot32.yaml); then one `loraforge eval` scoring, on the dev records, the base with the same 32 in
context (`--few-shot 32 --few-shot-data` that file) and the adapter, and, for the first seed only, the base
zero-shot (it does not depend on the seed; later seeds pass `--base false`). SST-2 answers by label-word scoring (the
likelier label after the prompt, so no answer is invalid), CoNLL by generating the entity list. Each command is
timed; OUT/summary.json holds the per-seed scores, the means and spreads, and the commands, for
bench/quality_table.py; the table is printed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loraforge.data.split import sample_few_shot

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.path.relpath(ROOT.parent / "shared" / "data"))  # relative to here, as the commands are shown


@dataclass(frozen=True)
class Task:
    config: str
    recipe: str
    dev: Path
    metric: str  # the key of results.json's metrics, reported x 100
    eval_args: tuple[str, ...]


TASKS = {
    "sst2": Task("examples/sst2_fewshot32.yaml", "sst2", DATA / "sst2" / "dev.tsv", "accuracy",
                 ("--answer", "label-words")),
    # the seeded 200-sentence sample of dev (eng.testa) that examples/conll2003.yaml validates on
    "conll2003": Task("examples/conll2003_fewshot32.yaml", "conll2003",
                      Path(os.path.relpath(ROOT / "runs" / "data" / "conll2003" / "dev200.conll")), "f1",
                      ("--file-format", "conll", "--max-new-tokens", "64")),
}


def draw(task: str, seed: int, n: int, out: Path) -> Path:
    """The seed's n training records, in the training file's own format."""
    if task == "sst2":
        with open(DATA / "sst2" / "train.tsv", encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
        path = out / f"sst2_{n}_seed{seed}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in sample_few_shot(rows, n, seed, label_key="label")))
        return path
    text = (DATA / "conll2003" / "eng.train").read_text(encoding="utf-8")
    sentences = [b.strip("\n") for b in text.split("\n\n") if b.strip() and not b.startswith("-DOCSTART-")]
    path = out / f"conll2003_{n}_seed{seed}.conll"
    path.write_text("\n\n".join(sample_few_shot(sentences, n, seed)) + "\n", encoding="utf-8")
    return path


def timed(command: list[str], log: list[dict]) -> None:
    start = time.perf_counter()
    subprocess.run(command, check=True)
    log.append({"command": shlex.join(command), "seconds": round(time.perf_counter() - start, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, default="sst2")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--max-examples", type=int, default=0, help="dev records scored (0 = all)")
    parser.add_argument("--output", help="default: runs/quality/{task}_fewshot")
    args, train_flags = parser.parse_known_args()  # the rest are `loraforge train` flags, over the config's
    task = TASKS[args.task]
    out = Path(args.output or f"runs/quality/{args.task}_fewshot")
    out.mkdir(parents=True, exist_ok=True)
    seeds, zero_shot = {}, None
    for seed in args.seeds:
        shots = draw(args.task, seed, args.shots, out)
        adapter, report = out / f"lora_seed{seed}", out / f"report_seed{seed}"
        log: list[dict] = []
        timed(["loraforge", "train", task.config, "--data", str(shots), "--max-examples", "0", "--val-data", "",
               "--seed", str(seed), "--output", str(adapter), "--overwrite", *train_flags], log)
        timed(["loraforge", "eval", "--recipe", task.recipe, "--data", str(task.dev), *task.eval_args,
               "--max-examples", str(args.max_examples), "--adapter", str(adapter), "--few-shot", str(args.shots),
               "--few-shot-data", str(shots), "--seed", str(seed), "--base", str(zero_shot is None).lower(),
               "--output", str(report)], log)
        models = json.loads((report / "results.json").read_text())["models"]
        score = {("lora" if m["adapter"] else "in-context" if m["few_shot"] else "zero-shot"):
                 100 * m["metrics"][task.metric] for m in models}
        zero_shot = score.setdefault("zero-shot", zero_shot)
        seeds[seed] = {**score, "minutes": round(sum(c["seconds"] for c in log) / 60, 1), "commands": log}
    mean = {k: statistics.mean(s[k] for s in seeds.values()) for k in ("zero-shot", "in-context", "lora")}
    spread = {k: statistics.stdev(s[k] for s in seeds.values()) if len(seeds) > 1 else 0.0 for k in mean}
    summary = {"task": args.task, "metric": task.metric, "shots": args.shots, "max_examples": args.max_examples,
               "seeds": seeds, "mean": mean, "sd": spread, "lora_minus_in_context": mean["lora"] - mean["in-context"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"| seed | zero-shot | {args.shots} in context | LoRA on the {args.shots} | minutes (train + eval) |")
    print("|---|---|---|---|---|")
    for seed, s in seeds.items():
        print(f"| {seed} | {s['zero-shot']:.1f} | {s['in-context']:.1f} | {s['lora']:.1f} | {s['minutes']} |")
    print(f"| mean (sd) | {mean['zero-shot']:.1f} | {mean['in-context']:.1f} ({spread['in-context']:.1f}) | "
          f"**{mean['lora']:.1f}** ({spread['lora']:.1f}) | |")
    print(f"{task.metric}: LoRA - in context: {summary['lora_minus_in_context']:+.1f} points", file=sys.stderr)


if __name__ == "__main__":
    main()
