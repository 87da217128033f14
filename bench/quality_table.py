"""Write the quality table (bench/quality.sh's runs) into bench/RESULTS.md, between the quality markers.

    python bench/quality_table.py runs/quality bench/RESULTS.md
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

START, END = "<!-- quality:start -->", "<!-- quality:end -->"


def conll_minilm(out: Path) -> tuple[str, str, str, float]:
    scores = json.loads((out / "conll_minilm" / "train_summary.json").read_text())["best_val_scores"]
    return "CoNLL-2003 NER, token classification", "MiniLM-L6 + LoRA + head", "entity F1 >= 90", 100 * scores["f1"]


def cuad(out: Path) -> tuple[str, str, str, float]:
    models = {m["name"]: m["metrics"]["perplexity"]
              for m in json.loads((out / "cuad-report" / "results.json").read_text())["models"]}
    base, tuned = models["base"], models["cuad"]
    return ("CUAD domain adaptation", "SmolLM2-135M + LoRA", "perplexity -30% vs base",
            100 * (tuned - base) / base)


def scitldr(out: Path) -> tuple[str, str, str, float]:
    models = {m["name"]: m["metrics"]["rougeL"]
              for m in json.loads((out / "scitldr-report" / "results.json").read_text())["models"]}
    return ("SciTLDR-A summarization", "SmolLM2-135M + LoRA", "ROUGE-L >= base + 10",
            100 * (models["scitldr"] - models["base"]))


def sst2_minilm(out: Path) -> tuple[str, str, str, float]:
    scores = json.loads((out / "sst2_minilm" / "train_summary.json").read_text())["best_val_scores"]
    return "SST-2", "MiniLM-L6 + LoRA + head", "accuracy >= 91", 100 * scores["accuracy"]


def sst2_fewshot(out: Path) -> tuple[str, str, str, float]:
    summary = json.loads((out / "sst2_fewshot" / "summary.json").read_text())
    mean = summary["mean"]
    return ("SST-2, 32 examples (accuracy: LoRA - the same 32 in context)", "SmolLM2-135M + LoRA",
            f"in-context + 5 (mean of 3 seeds; LoRA {mean['lora']:.1f}, in context {mean['in-context']:.1f})",
            summary["lora_minus_in_context"])


ROWS = {"conll_minilm": (conll_minilm, 30), "cuad": (cuad, 30), "scitldr": (scitldr, 45),
        "sst2_minilm": (sst2_minilm, 30), "sst2_fewshot": (sst2_fewshot, 15)}


def main() -> None:
    out, results = Path(sys.argv[1]), Path(sys.argv[2])
    lines = [START, f"Written by `bench/quality.sh` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{platform.machine()}; dev splits only.", "",
             "| task | model | goal (dev) | dev score | wall time | budget | commands |", "|---|---|---|---|---|---|---|"]
    for row, (read, budget) in ROWS.items():
        if not (out / f"{row}.seconds").is_file():
            continue
        task, model, goal, score = read(out)
        minutes = sum(int(s) for s in (out / f"{row}.seconds").read_text().split()) / 60
        commands = "<br>".join(f"`{c}`" for c in (out / f"{row}.commands").read_text().splitlines())
        shown = f"{score:+.1f}%" if "%" in goal else f"{score:+.1f}" if " + " in goal else f"{score:.1f}"
        lines.append(f"| {task} | {model} | {goal} | **{shown}** | {minutes:.1f} min | {budget} min | {commands} |")
    lines.append(END)
    text = results.read_text(encoding="utf-8")
    if START in text:
        text = text[:text.index(START)] + "\n".join(lines) + text[text.index(END) + len(END):]
    else:
        text += "\n## Quality: the example configs on dev splits — `bench/quality.sh`\n\n" + "\n".join(lines) + "\n"
    results.write_text(text, encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
