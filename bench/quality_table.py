"""Write the quality table (bench/quality.sh's runs) into bench/RESULTS.md, between the quality markers.

    python bench/quality_table.py runs/quality bench/RESULTS.md
"""
from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

START, END = "<!-- quality:start -->", "<!-- quality:end -->"


TASKS = {"conll_minilm": ("CoNLL-2003 NER, token classification", "MiniLM-L6 + LoRA + head"),
         "cuad": ("CUAD domain adaptation", "SmolLM2-135M + LoRA"),
         "scitldr": ("SciTLDR-A summarization", "SmolLM2-135M + LoRA"),
         "sst2_minilm": ("SST-2", "MiniLM-L6 + LoRA + head"),
         "sst2": ("SST-2, label words scored", "SmolLM2-135M + LoRA"),
         "conll": ("CoNLL-2003 NER as generation", "SmolLM2-135M + LoRA"),
         "sst2_fewshot": ("SST-2, 32 examples (accuracy: LoRA - the same 32 in context)", "SmolLM2-135M + LoRA"),
         "conll_fewshot": ("CoNLL-2003 NER as generation, 32 examples (entity F1: LoRA - the same 32 in context)",
                           "SmolLM2-135M + LoRA")}
"""Each row's task and model cells: what a rerun writes, and how an earlier line is recognised."""


def conll_minilm(out: Path) -> tuple[str, float]:
    scores = json.loads((out / "conll_minilm" / "train_summary.json").read_text())["best_val_scores"]
    return "entity F1 >= 90", 100 * scores["f1"]


def cuad(out: Path) -> tuple[str, float]:
    models = {m["name"]: m["metrics"]["perplexity"]
              for m in json.loads((out / "cuad-report" / "results.json").read_text())["models"]}
    base, tuned = models["base"], models["cuad"]
    return "perplexity -30% vs base", 100 * (tuned - base) / base


def scitldr(out: Path) -> tuple[str, float]:
    models = {m["name"]: m["metrics"]["rougeL"]
              for m in json.loads((out / "scitldr-report" / "results.json").read_text())["models"]}
    return "ROUGE-L >= base + 10", 100 * (models["scitldr"] - models["base"])


def sst2_minilm(out: Path) -> tuple[str, float]:
    scores = json.loads((out / "sst2_minilm" / "train_summary.json").read_text())["best_val_scores"]
    return "accuracy >= 91", 100 * scores["accuracy"]


def adapter_metric(report: str, metric: str, goal: str) -> Callable[[Path], tuple[str, float]]:
    """The adapter's score in a `loraforge eval` report of one adapter (the base not scored: --base false)."""
    def read(out: Path) -> tuple[str, float]:
        models = json.loads((out / report / "results.json").read_text())["models"]
        (tuned,) = [m for m in models if m["adapter"]]
        return goal, 100 * tuned["metrics"][metric]
    return read


def fewshot(folder: str, goal: str) -> Callable[[Path], tuple[str, float]]:
    def read(out: Path) -> tuple[str, float]:
        summary = json.loads((out / folder / "summary.json").read_text())
        mean, sd, seeds = summary["mean"], summary["sd"], summary["seeds"].values()
        training = max(s["commands"][0]["seconds"] for s in seeds) / 60  # the first command of a seed trains
        return (f"{goal} (mean of {len(seeds)} seeds; LoRA {mean['lora']:.1f} sd {sd['lora']:.1f}, in context "
                f"{mean['in-context']:.1f} sd {sd['in-context']:.1f}, zero-shot {mean['zero-shot']:.1f}; "
                f"training {training:.1f} min a seed at most)",
                summary["lora_minus_in_context"])
    return read


FEWSHOT_BUDGET = "5 min a seed's training"
ROWS = {"conll_minilm": (conll_minilm, "30 min"), "cuad": (cuad, "30 min"), "scitldr": (scitldr, "45 min"),
        "sst2_minilm": (sst2_minilm, "30 min"),
        "sst2": (adapter_metric("sst2-report", "accuracy", "accuracy >= 91"), "30 min"),
        "conll": (adapter_metric("conll-report", "f1", "entity F1 >= 85"), "45 min"),
        "sst2_fewshot": (fewshot("sst2_fewshot", "LoRA >= in-context + 5"), FEWSHOT_BUDGET),
        "conll_fewshot": (fewshot("conll2003_fewshot", "LoRA > in-context + 0"), FEWSHOT_BUDGET)}


def main() -> None:
    out, results = Path(sys.argv[1]), Path(sys.argv[2])
    text = results.read_text(encoding="utf-8")
    earlier = earlier_rows(text[text.index(START):text.index(END)]) if START in text else {}
    lines = [START, f"Written by `bench/quality.sh`, {platform.machine()}; dev splits only. A row not rerun keeps its "
             "earlier line and date.", "", "| task | model | goal (dev) | dev score | wall time | budget | measured | "
             "commands |", "|---|---|---|---|---|---|---|---|"]
    for row, (read, budget) in ROWS.items():
        if not (out / f"{row}.seconds").is_file():
            if row in earlier:
                lines.append(earlier[row])
            continue
        (task, model), (goal, score) = TASKS[row], read(out)
        minutes = sum(int(s) for s in (out / f"{row}.seconds").read_text().split()) / 60
        measured = time.strftime("%Y-%m-%d", time.gmtime((out / f"{row}.seconds").stat().st_mtime))  # the run's day
        commands = "<br>".join(f"`{c}`" for c in (out / f"{row}.commands").read_text().splitlines())
        shown = f"{score:+.1f}%" if "%" in goal else f"{score:+.1f}" if " + " in goal else f"{score:.1f}"
        lines.append(f"| {task} | {model} | {goal} | **{shown}** | {minutes:.1f} min | {budget} | {measured} | "
                     f"{commands} |")
    lines.append(END)
    if START in text:
        text = text[:text.index(START)] + "\n".join(lines) + text[text.index(END) + len(END):]
    else:
        text += "\n## Quality: the example configs on dev splits — `bench/quality.sh`\n\n" + "\n".join(lines) + "\n"
    results.write_text(text, encoding="utf-8")
    print("\n".join(lines))


def earlier_rows(table: str) -> dict[str, str]:
    """The table's rows by ROWS key, matched on their task and model cells, as written."""
    cells = {tuple(line.strip("| ").split(" | ")[:2]): line for line in table.splitlines() if line.startswith("| ")}
    return {key: cells[TASKS[key]] for key in ROWS if TASKS[key] in cells}


if __name__ == "__main__":
    main()
