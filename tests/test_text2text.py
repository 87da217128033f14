"""Your own task, declared from columns and a metric (`--recipe text2text`): the recipe, the text metrics, and the
whole path (train on a CSV, then `eval` and `predict` read the declaration from the adapter and score answers)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fixtures.tiny_models import save_tiny_llama
from loraforge.cli import main
from loraforge.config import TrainConfig
from loraforge.data import Record, make_recipe
from loraforge.errors import LoraforgeError
from loraforge.metrics import get_metric

torch.set_num_threads(1)

ROWS = [  # words of the tiny vocabulary
    {"context": "the river pub food english", "question": "food", "answer": "english"},
    {"context": "the city shop food italian", "question": "food", "answer": "italian"},
    {"context": "the pub near the river", "question": "name", "answer": "river"},
    {"context": "the coffee shop rating high", "question": "rating", "answer": "high"},
]


def _record(fields: dict) -> Record:
    return Record(fields, "qa.csv", 2)


def test_text2text_reads_one_or_several_input_columns():
    one = make_recipe("text2text", {"input": "question", "output": "answer"}, instruction="Answer.")
    record = _record(ROWS[0])
    assert one.prompt(record) == ("Answer.", "food")
    assert one.target(record) == "english" and one.reference(record) == ["english"]
    assert one.metric == "token_f1"
    two = make_recipe("text2text", {"input": "context+question", "output": "answer"})
    assert two.prompt(record)[1] == "context: the river pub food english\nquestion: food"
    assert two.parse_prediction("english\n\nmore text", record) == "english"
    refs = make_recipe("text2text", {"input": "question", "output": "answers"})
    assert refs.reference(_record({"question": "q", "answers": ["a", " b ", ""]})) == ["a", "b"]


def test_a_missing_column_names_the_record_and_its_columns():
    recipe = make_recipe("text2text", {"input": "context+query", "output": "answer"})
    with pytest.raises(LoraforgeError, match=r'qa.csv:2: field "query" \(as "input"\) is missing.*"question"'):
        recipe.prompt(_record(ROWS[0]))


def test_metric_and_instruction_are_declared_on_text_recipes_only():
    assert make_recipe("e2e", metric="chrf").metric == "chrf"
    assert make_recipe("scitldr", instruction="TL;DR:").instruction == "TL;DR:"
    with pytest.raises(LoraforgeError, match="sst2 recipe is scored by accuracy_macro_f1"):
        make_recipe("sst2", metric="bleu")
    with pytest.raises(LoraforgeError, match="choose one of exact_match, token_f1, rouge_l, bleu, chrf"):
        make_recipe("text2text", metric="meteor")
    with pytest.raises(LoraforgeError, match="add --recipe"):
        TrainConfig(data="x.csv", metric="chrf")
    with pytest.raises(LoraforgeError, match='text2text recipe has no field "question"'):
        TrainConfig(data="x.csv", recipe="text2text", columns={"question": "q"})


def test_text_metrics_closed_form():
    em = get_metric("exact_match")(["The English.", "italian food"], [["english"], ["italian"]])
    assert em == {"exact_match": 0.5, "f1": pytest.approx((1 + 2 * 0.5 * 1 / 1.5) / 2)}  # F1 of 1/2 words: 2/3
    assert get_metric("token_f1") is get_metric("exact_match")
    assert get_metric("chrf")(["the river pub"], [["the river pub"]]) == {"chrf": 1.0}
    assert get_metric("chrf")(["xyz"], [["abc"]]) == {"chrf": 0.0}
    assert get_metric("rouge_l")(["the river pub"], [["the river"]])["rougeL"] == pytest.approx(0.8)  # P 2/3, R 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text2text")
    data = root / "qa.csv"
    with open(data, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)
    llama = save_tiny_llama(root / "llama", seed=0)
    out = root / "adapter"
    code = main(["train", "--model", str(llama), "--data", str(data), "--recipe", "text2text",
                 "--columns", "input=context+question,output=answer", "--metric", "exact_match",
                 "--instruction", "name the food", "--output", str(out), "--max-steps", "60", "--batch-size", "4",
                 "--lr", "0.01", "--schedule", "constant", "--lora-dropout", "0", "--r", "8",
                 # lm_head too: the tiny model's head (std 0.02) caps its logit gaps near 1 without it
                 "--target-modules", "q_proj,k_proj,v_proj,o_proj,down_proj,lm_head", "--threads", "1"])
    assert code == 0
    return {"data": data, "adapter": out, "root": root}


def test_eval_scores_the_declared_task_base_and_tuned(trained):
    report = trained["root"] / "eval"
    assert main(["eval", "--adapter", str(trained["adapter"]), "--data", str(trained["data"]),
                 "--max-new-tokens", "3", "--output", str(report)]) == 0
    results = json.loads((report / "results.json").read_text())
    assert results["metric"] == "exact_match"
    rows = {m["name"]: m["metrics"] for m in results["models"]}
    assert set(rows) == {"base", "adapter"}
    assert rows["adapter"] == {"exact_match": 1.0, "f1": 1.0}  # 60 steps on the 4 rows: learned by heart
    assert rows["base"]["exact_match"] == 0.0  # a random tiny model does not know the answers
    report_md = (report / "report.md").read_text()  # base and tuned answers side by side
    assert "| context: the river pub food english<br>question: food | english | Input no and | english |" in report_md


def test_predict_reads_the_declaration_from_the_adapter(trained, capsys):
    out = trained["root"] / "pred.jsonl"
    assert main(["predict", "--adapter", str(trained["adapter"]), "--data", str(trained["data"]),
                 "--max-new-tokens", "3", "--output", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["prediction"] for p in lines] == [r["answer"] for r in ROWS]
    assert "exact_match" in capsys.readouterr().out
