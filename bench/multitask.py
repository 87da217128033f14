"""The multi-task report: four tasks, their single adapters, and every way loraforge makes one model of them.

    python bench/multitask.py                      # all stages; each one skipped when its output is already there
    python bench/multitask.py --steps 100          # a shorter training budget per single adapter (and joint)
    python bench/multitask.py --until combine      # stop after a stage (data, single, joint, router, combine, eval)

Tasks (train and dev splits only; the official test splits are never read):
- sentiment: SST-2 (`examples/sst2.yaml`), accuracy;
- ner: CoNLL-2003 as generation (`examples/conll2003.yaml`), entity F1, and the share of outputs that parse;
- summary: SciTLDR (`examples/scitldr.yaml`), ROUGE-L;
- data2text: E2E (`examples/e2e.yaml`), BLEU.

Each task's dev split is cut in two, in file order: a validation part (the first `val` items: what combination
weights are chosen on) and a report part (the next `report` items: what the table scores). Stages:
1. data: the two parts of each dev split, in the file's own format, under WORK/data/.
2. single: each example config trained as it is (its steps, unless --steps), validation off (`--val-data ""`):
   WORK/single/<task>/.
3. joint: one adapter on all four training files (`mix:` in a YAML), each capped to the examples its single adapter
   saw (its train_tokens over its mean example length), mixed by size (T=1), one epoch: the same examples and
   about the same tokens as the four single runs together; LoRA settings (rank, targets, lr) from the SST-2
   config. WORK/joint/.
4. router: `loraforge router` on 200 training inputs per task (20% held out for its accuracy), features from an
   early layer over the prompt's first tokens (ROUTER_LAYER, ROUTER_TOKENS). WORK/router/.
5. combine: every `loraforge combine` method over the four singles, the weight (the same for each adapter) chosen
   from WEIGHTS by the mean share of the validation loss gain kept, (base - row) / (base - single) per task.
   WORK/combined/<method>/ and WORK/combined/selection.json.
6. eval: `loraforge eval --tasks WORK/tasks.yaml --output WORK/report` (the table, its plots, one report per task),
   and the table written into bench/RESULTS.md between the multitask markers.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LORAFORGE = [sys.executable, "-m", "loraforge"]
METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
WEIGHTS = (0.5, 0.75, 1.0)
DENSITY = 0.5
SVD_RANK = 32
"""`svd` keeps half of `cat`'s rank 64; the pruning methods are factored back at rank 64 (all of it)."""
PRUNED_RANK = 64
VAL_RECORDS = 32
"""Validation records per task that a combination weight is chosen on (their answers' loss)."""
ROUTER_LAYER, ROUTER_TOKENS = 4, 128
"""The router reads decoder layer 4 of 30 over a prompt's first 128 tokens: its forward is ~1/7 of a prefill of
those tokens, and the four tasks' prompts differ from their first words."""
STAGES = ("data", "single", "joint", "router", "combine", "eval")

TASKS = {
    "sentiment": {"config": "examples/sst2.yaml", "recipe": "sst2", "columns": {"text": "sentence"},
                  "train": SHARED / "sst2/train.tsv", "dev": SHARED / "sst2/dev.tsv", "file_format": None,
                  "val": 64, "report": 100, "max_new_tokens": 8},
    "ner": {"config": "examples/conll2003.yaml", "recipe": "conll2003", "columns": None,
            "train": SHARED / "conll2003/eng.train", "dev": SHARED / "conll2003/eng.testa", "file_format": "conll",
            "val": 48, "report": 80, "max_new_tokens": 64},
    "summary": {"config": "examples/scitldr.yaml", "recipe": "scitldr", "columns": None,
                "train": SHARED / "scitldr/train.jsonl", "dev": SHARED / "scitldr/dev.jsonl", "file_format": None,
                "val": 24, "report": 40, "max_new_tokens": 64},
    "data2text": {"config": "examples/e2e.yaml", "recipe": "e2e", "columns": None,
                  "train": SHARED / "e2e/trainset.csv", "dev": SHARED / "e2e/devset.csv", "file_format": None,
                  "val": 32, "report": 40, "max_new_tokens": 64},
}


def run(cmd: list[str], log: Path) -> float:
    """Run a loraforge command, its output appended to `log`; its wall seconds. Stops the bench if it fails."""
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(map(str, cmd))}\n")
        fh.flush()
        code = subprocess.call([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    print(f"  {seconds / 60:5.1f} min  {' '.join(map(str, cmd[2:]))}", flush=True)
    if code:
        sys.exit(f"failed (exit {code}); see {log}")
    return seconds


# ---- 1. data ----------------------------------------------------------------------------------------------------
def split_dev(task: str, spec: dict, out: Path) -> dict[str, Path]:
    """The dev split's first `val` items and the `report` items after them, in its own format. An item is a row
    (SST-2), a sentence (CoNLL, without -DOCSTART-), a paper (SciTLDR), or an MR with all its references (E2E)."""
    dev: Path = spec["dev"]
    n_val, n_report = spec["val"], spec["report"]
    suffix = {"conll": ".conll"}.get(spec["file_format"], dev.suffix)
    paths = {part: out / f"{task}_{part}{suffix}" for part in ("val", "report")}
    if task == "ner":
        blocks = [b.strip("\n") for b in dev.read_text(encoding="utf-8").split("\n\n") if b.strip()]
        items = [b for b in blocks if not b.startswith("-DOCSTART-")]
        parts = {"val": items[:n_val], "report": items[n_val:n_val + n_report]}
        for part, chosen in parts.items():
            paths[part].write_text("\n\n".join(chosen) + "\n", encoding="utf-8")
    elif dev.suffix in (".tsv", ".csv"):
        delimiter = "\t" if dev.suffix == ".tsv" else ","
        with dev.open(encoding="utf-8", newline="") as fh:
            header, *rows = list(csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL))
        groups: list[list[list[str]]] = []
        for row in rows:  # E2E: consecutive rows of one MR are one item
            if task == "data2text" and groups and groups[-1][0][0] == row[0]:
                groups[-1].append(row)
            else:
                groups.append([row])
        parts = {"val": groups[:n_val], "report": groups[n_val:n_val + n_report]}
        for part, chosen in parts.items():
            with paths[part].open("w", encoding="utf-8", newline="") as fh:
                csv.writer(fh, delimiter=delimiter, lineterminator="\n").writerows([header] + [r for g in chosen
                                                                                            for r in g])
    else:
        lines = [line for line in dev.read_text(encoding="utf-8").splitlines() if line.strip()]
        parts = {"val": lines[:n_val], "report": lines[n_val:n_val + n_report]}
        for part, chosen in parts.items():
            paths[part].write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return paths


# ---- 3. joint ---------------------------------------------------------------------------------------------------
def mean_example_tokens(spec: dict, max_length: int) -> float:
    """Mean tokens of one training example (prompt + answer, cut to max_length), over a seeded 300-record sample."""
    from transformers import AutoTokenizer

    from loraforge.data import load_examples, make_recipe
    from loraforge.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    examples, _ = load_examples(spec["train"], tokenizer, max_length,
                                recipe=make_recipe(spec["recipe"], spec["columns"]),
                                file_format=spec["file_format"], max_examples=300, seed=0)
    return sum(len(ex.input_ids) for ex in examples) / len(examples)


def joint_config(work: Path, configs: dict[str, dict]) -> tuple[Path, dict]:
    """The joint run's YAML: each dataset capped to what its single adapter saw."""
    mix, budget = [], {}
    for task, spec in TASKS.items():
        summary = json.loads((work / "single" / task / "train_summary.json").read_text(encoding="utf-8"))
        per_example = mean_example_tokens(spec, configs[task]["max_length"])
        seen = max(1, round(summary["train_tokens"] / per_example))
        budget[task] = {"train_tokens": summary["train_tokens"], "steps": summary["steps"],
                        "mean_example_tokens": round(per_example, 1), "examples_seen": seen}
        entry = {"data": str(spec["train"]), "recipe": spec["recipe"], "max_examples": seen}
        if spec["columns"]:
            entry["columns"] = spec["columns"]
        if spec["file_format"]:
            entry["file_format"] = spec["file_format"]
        mix.append(entry)
    base = configs["sentiment"]
    config = {"mix": mix, "mix_temperature": 1.0, "output": str(work / "joint"), "model": base["model"],
              "dtype": base["dtype"], "packing": True, "max_length": max(c["max_length"] for c in configs.values()),
              "batch_size": 2, "epochs": 1, "lr": base["lr"], "warmup_steps": base["warmup_steps"],
              "schedule": base["schedule"], "r": base["r"], "lora_alpha": base["lora_alpha"],
              "lora_dropout": base["lora_dropout"], "seed": 0, "release_memory": False}
    if base.get("target_modules"):  # SST-2's, as its lr and rank are (every linear layer, as CoNLL's too)
        config["target_modules"] = base["target_modules"]
    path = work / "joint.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path, budget


# ---- 5. combine -------------------------------------------------------------------------------------------------
def choose_combinations(work: Path, data: dict[str, dict[str, Path]]) -> dict:
    """Each method at each weight of WEIGHTS, scored by validation loss: the mean over tasks of the share of the
    loss gain kept, (base - combined) / (base - single). The best weight's adapter is saved."""
    import torch

    from loraforge.data import collate, load_examples, make_recipe, pad_id_for
    from loraforge.infer.score import token_nll
    from loraforge.infer.session import InferenceSession
    from loraforge.lora.adapter import read_adapter
    from loraforge.lora.combine import combine

    torch.manual_seed(0)
    session = InferenceSession.open("smollm2-135m-instruct", dtype="float32")
    pad = pad_id_for(session.tokenizer)
    batches = {}
    for task, spec in TASKS.items():
        examples, _ = load_examples(data[task]["val"], session.tokenizer, 1024,
                                    recipe=make_recipe(spec["recipe"], spec["columns"]),
                                    file_format=spec["file_format"])
        examples = examples[:VAL_RECORDS]  # E2E's 32 MRs are ~290 records: the first 32 records suffice for a loss
        batches[task] = [collate(examples[i:i + 8], pad) for i in range(0, len(examples), 8)]

    def val_loss(adapter: str | None) -> dict[str, float]:
        losses = {}
        for task, chunks in batches.items():
            total, count = 0.0, 0
            with session.use(adapter) as model:
                for batch in chunks:
                    nll, n = token_nll(model, batch)
                    total, count = total + float(nll.sum()), count + int(n.sum())
            losses[task] = total / count
        return losses

    singles = {task: read_adapter(work / "single" / task) for task in TASKS}
    for task, weights in singles.items():
        session.add_adapter(f"single-{task}", weights)
    base = val_loss(None)
    single = {task: val_loss(f"single-{task}")[task] for task in TASKS}
    trials, chosen = [], {}
    for method in METHODS:
        best = None
        for w in WEIGHTS:
            start = time.perf_counter()
            rank = SVD_RANK if method == "svd" else PRUNED_RANK if method not in ("cat", "linear") else None
            density = DENSITY if method not in ("cat", "linear", "svd") else None
            combined = combine(list(singles.values()), method, [w] * len(singles), rank=rank, density=density,
                               seed=0)
            session.add_adapter("candidate", combined.adapter)
            losses = val_loss("candidate")
            kept = {t: (base[t] - losses[t]) / (base[t] - single[t]) for t in TASKS}
            trial = {"method": method, "weight": w, "rank": rank, "density": density, "val_loss": losses,
                     "loss_gain_kept": kept, "mean_kept": sum(kept.values()) / len(kept),
                     "seconds": round(time.perf_counter() - start, 1)}
            trials.append(trial)
            print(f"  {method:16s} w={w:<5} mean loss gain kept {trial['mean_kept']:.3f} "
                  f"({trial['seconds']:.0f} s)", flush=True)
            if best is None or trial["mean_kept"] > best[0]["mean_kept"]:
                best = (trial, combined)
        session.remove_adapter("candidate")
        trial, combined = best
        out = work / "combined" / method
        combined.save(out)
        chosen[method] = {"weight": trial["weight"], "rank": trial["rank"], "density": trial["density"],
                          "mean_loss_gain_kept": round(trial["mean_kept"], 4), "path": str(out)}
    selection = {"base_val_loss": base, "single_val_loss": single, "chosen": chosen, "trials": trials}
    (work / "combined" / "selection.json").write_text(json.dumps(selection, indent=2) + "\n", encoding="utf-8")
    return selection


# ---- 6. eval ----------------------------------------------------------------------------------------------------
def task_list(work: Path, data: dict[str, dict[str, Path]]) -> Path:
    tasks = []
    for task, spec in TASKS.items():
        entry = {"name": task, "recipe": spec["recipe"], "data": str(data[task]["report"]),
                 "adapter": str(work / "single" / task), "max_new_tokens": spec["max_new_tokens"]}
        if spec["columns"]:
            entry["columns"] = spec["columns"]
        if spec["file_format"]:
            entry["file_format"] = spec["file_format"]
        tasks.append(entry)
    models = {"joint": str(work / "joint"), **{m: str(work / "combined" / m) for m in METHODS}}
    listing = {"model": "smollm2-135m-instruct", "tasks": tasks, "models": models, "router": str(work / "router")}
    path = work / "tasks.yaml"
    path.write_text(yaml.safe_dump(listing, sort_keys=False), encoding="utf-8")
    return path


def record(work: Path, args: argparse.Namespace, budget: dict, selection: dict, seconds: dict[str, float]) -> None:
    """The table (the eval's multitask.md) and how it was made, between the markers in bench/RESULTS.md."""
    report = (work / "report" / "multitask.md").read_text(encoding="utf-8")
    table = report.split("<!-- table -->", 2)[1] if "<!-- table -->" in report else report
    chosen = ", ".join(f"{m} w={c['weight']}" for m, c in selection["chosen"].items())
    goals = goal_lines(json.loads((work / "report" / "multitask.json").read_text(encoding="utf-8")))
    router = json.loads((work / "router" / "router.json").read_text(encoding="utf-8"))
    lines = [
        f"Written by `python bench/multitask.py{' --steps ' + str(args.steps) if args.steps else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.uname().machine}, {os.cpu_count()} cores; "
        "dev splits only (a validation part for the weights, a report part for the table).",
        "",
        "Training (real tokens, steps, minutes of steps): " + ", ".join(
            f"{t} {b['train_tokens']:,} in {b['steps']} steps, {b['train_seconds'] / 60:.1f} min"
            for t, b in budget.get("single", {}).items())
        + (f"; joint {budget['joint']['train_tokens']:,} in {budget['joint']['steps']} steps, "
           f"{budget['joint']['train_seconds'] / 60:.1f} min" if "joint" in budget else "")
        + " (the runs shared the CPU with other jobs at times: minutes are not a speed measurement).",
        f"Combination weights chosen on validation loss: {chosen}.",
        f"Router: layer {router['layer']}, first {router['max_length']} prompt tokens; held-out accuracy "
        f"{router['accuracy']:.4f} on {sum(c['val'] for c in router['counts'].values())} training prompts.",
        "Stage times of this invocation (min; a stage already done is skipped): "
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in seconds.items()) + ".",
        "",
        table.strip(),
        "",
        "| goal | measured | |",
        "|---|---|---|",
        *goals,
    ]
    results = ROOT / "bench" / "RESULTS.md"
    text = results.read_text(encoding="utf-8")
    start, end = "<!-- multitask:start -->", "<!-- multitask:end -->"
    block = start + "\n" + "\n".join(lines) + "\n" + end
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += "\n## Multi-task: one model for four tasks — `bench/multitask.py`\n\n" + block + "\n"
    results.write_text(text, encoding="utf-8")


def goal_lines(data: dict) -> list[str]:
    """The issue's three goals as table rows, from multitask.json."""
    rows = {r["name"]: r for r in data["rows"]}
    multi = [r for r in data["rows"] if r["name"] not in ("base", "single")]
    static = [r for r in multi if r["name"] in METHODS]
    best = max(multi, key=lambda r: r["worst_gain_kept"] if r["worst_gain_kept"] is not None else -math.inf)
    best_static = max(static, key=lambda r: r["mean_gain_kept"] if r["mean_gain_kept"] is not None else -math.inf)
    joint = rows.get("joint")

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [f"| best multi-task model keeps >= 95% of the gain on the worst task | {best['name']}: "
             f"{pct(best['worst_gain_kept'])} | {'met' if (best['worst_gain_kept'] or 0) >= 0.95 else 'not met'} |",
             f"| best static combination keeps >= 70% of the mean gain | {best_static['name']}: "
             f"{pct(best_static['mean_gain_kept'])}" + (f" (joint training, also one adapter: "
                                                         f"{pct(joint['mean_gain_kept'])})" if joint else "")
             + f" | {'met' if (best_static['mean_gain_kept'] or 0) >= 0.70 else 'not met'} |"]
    if "routed" in rows:
        ratio = rows["routed"]["tokens_per_second"] / rows["single"]["tokens_per_second"]
        lines.append(f"| routing costs <= 5% of mixed-batch throughput | routed {rows['routed']['tokens_per_second']:.1f}"
                     f" vs direct {rows['single']['tokens_per_second']:.1f} tokens/s: {ratio:.3f}x | "
                     f"{'met' if ratio >= 0.95 else 'not met'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(ROOT / "runs" / "multitask"))
    parser.add_argument("--steps", type=int, default=0, help="steps per single adapter (0: each config's own)")
    parser.add_argument("--until", choices=STAGES, default="eval")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-record", action="store_true", help="do not write bench/RESULTS.md")
    args = parser.parse_args()
    work = Path(args.work)
    (work / "data").mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    seconds: dict[str, float] = {}
    stop = STAGES.index(args.until)
    configs = {t: yaml.safe_load((ROOT / s["config"]).read_text(encoding="utf-8")) for t, s in TASKS.items()}

    print("1. data", flush=True)
    data = {task: split_dev(task, spec, work / "data") for task, spec in TASKS.items()}
    if stop < 1:
        return
    print("2. single adapters", flush=True)
    start = time.perf_counter()
    for task, spec in TASKS.items():
        out = work / "single" / task
        if not (out / "train_summary.json").is_file():
            steps = ["--max-steps", str(args.steps)] if args.steps else []
            run([*LORAFORGE, "train", spec["config"], "--output", out, "--val-data", "", "--eval-every", "0",
                 "--overwrite", *steps], log)
    seconds["single"] = time.perf_counter() - start
    budget: dict = {"single": {t: json.loads((work / "single" / t / "train_summary.json").read_text())
                               for t in TASKS}}
    if stop < 2:
        return
    print("3. joint", flush=True)
    start = time.perf_counter()
    if not (work / "joint" / "train_summary.json").is_file():
        config, caps = joint_config(work, configs)
        (work / "joint_budget.json").write_text(json.dumps(caps, indent=2) + "\n", encoding="utf-8")
        run([*LORAFORGE, "train", config, "--overwrite"], log)
    budget["joint"] = json.loads((work / "joint" / "train_summary.json").read_text())
    seconds["joint"] = time.perf_counter() - start
    if stop < 3:
        return
    print("4. router", flush=True)
    start = time.perf_counter()
    if not (work / "router" / "router.json").is_file():
        cmd = [*LORAFORGE, "router", "--output", work / "router", "--model", "smollm2-135m-instruct",
               "--layer", str(ROUTER_LAYER), "--max-length", str(ROUTER_TOKENS)]
        for task, spec in TASKS.items():
            cmd += ["--adapter", work / "single" / task, "--data", f"{task}={spec['train']}",
                    "--recipe", f"{task}={spec['recipe']}"]
            if spec["columns"]:
                cmd += ["--columns", f"{task}=" + ",".join(f"{k}={v}" for k, v in spec["columns"].items())]
            if spec["file_format"]:
                cmd += ["--file-format", f"{task}={spec['file_format']}"]
        run(cmd, log)
    seconds["router"] = time.perf_counter() - start
    if stop < 4:
        return
    print("5. combinations", flush=True)
    start = time.perf_counter()
    selection_path = work / "combined" / "selection.json"
    if not selection_path.is_file():
        choose_combinations(work, data)
    selection = json.loads(selection_path.read_text(encoding="utf-8"))
    seconds["combine"] = time.perf_counter() - start
    if stop < 5:
        return
    print("6. eval", flush=True)
    start = time.perf_counter()
    run([*LORAFORGE, "eval", "--tasks", task_list(work, data), "--output", work / "report",
         "--batch-size", str(args.batch_size)], log)
    seconds["eval"] = time.perf_counter() - start
    if not args.no_record:
        record(work, args, budget, selection, seconds)
    print((work / "report" / "multitask.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
