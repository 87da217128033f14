"""`loraforge eval --tasks`: several tasks, their single adapters, a combined adapter and a router in one table.

Each row of the multi-task run must equal `loraforge eval` of that model alone on that task (the rows decode all
tasks together, mixed); the routed row must equal, example by example, the adapter it was routed to; the ratios and
gain shares are checked against hand-computed numbers; the task list's problems name the file, line and field."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from fixtures.tiny_models import save_tiny_llama, write_jsonl
from loraforge.cli import main
from loraforge.data.ner import entities_parse
from loraforge.errors import LoraforgeError
from loraforge.eval.config import EvalConfig
from loraforge.eval.multitask import (BASE, SINGLE, MultiTaskResult, RowResult, TaskSpec, read_task_list,
                                      run_multitask)
from loraforge.eval.run import run_eval
from loraforge.infer import InferenceSession, RouterData, train_router
from loraforge.lora import LoraConfig, LoraModel, save_adapter
from loraforge.lora.combine import combine_adapters
from loraforge.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

D2T = [{"mr": "name river pub food english", "ref": "the river pub is an english pub"},
       {"mr": "name river pub food english", "ref": "an english pub near the river"},
       {"mr": "name city coffee shop rating high", "ref": "the city coffee shop has a high rating"},
       {"mr": "name the shop food italian", "ref": "the shop is italian"}]
SENT = [{"sentence": "the cheap pub is family friendly", "label": 1}, {"sentence": "the food is low", "label": 0},
        {"sentence": "an italian restaurant with high rating", "label": 1}]
NER = "the X X O\nriver X X B-LOC\npub X X O\n\ncity X X B-LOC\ncentre X X I-LOC\nshop X X O\n\nthe X X O\n" \
      "coffee X X B-ORG\nshop X X I-ORG\n"
TASKS = {"d2t": ("e2e", "d2t.jsonl", None, None), "sent": ("sst2", "sent.jsonl", {"text": "sentence"}, None),
         "ner": ("conll2003", "ner.conll", None, "conll")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask")
    llama = save_tiny_llama(root / "llama", seed=0)
    files = {"d2t": write_jsonl(root / "d2t.jsonl", D2T), "sent": write_jsonl(root / "sent.jsonl", SENT)}
    (root / "ner.conll").write_text(NER, encoding="utf-8")
    files["ner"] = root / "ner.conll"
    singles = {}
    for k, task in enumerate(TASKS):
        model, _ = load_model(str(llama))
        torch.manual_seed(50 + k)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False, base_model_name_or_path=str(llama))
        singles[task] = save_adapter(LoraModel(model, config), root / "single" / task)
    combine_adapters(list(singles.values()), root / "cat", "cat", [0.5, 0.5, 0.5])
    joint = root / "cat"
    session = InferenceSession.open(str(llama), {t: str(p) for t, p in singles.items()})
    router = train_router(session, [RouterData(t, files[t], recipe=TASKS[t][0], columns=TASKS[t][2],
                                               file_format=TASKS[t][3]) for t in TASKS], val_split=0.0)
    router.save(root / "router")
    listing = {"model": str(llama),
               "tasks": [{"name": t, "recipe": r, "data": str(files[t]), "adapter": str(singles[t]),
                          "max_new_tokens": 6, **({"columns": c} if c else {}), **({"file_format": f} if f else {})}
                         for t, (r, _, c, f) in TASKS.items()],
               "models": {"cat": str(root / "cat")}, "router": str(root / "router")}
    tasks_yaml = root / "tasks.yaml"
    tasks_yaml.write_text(yaml.safe_dump(listing, sort_keys=False), encoding="utf-8")
    cfg = EvalConfig(tasks=str(tasks_yaml), batch_size=4, output=str(root / "report"))
    return {"root": root, "llama": llama, "files": files, "singles": singles, "joint": joint, "cfg": cfg,
            "result": run_multitask(cfg), "yaml": tasks_yaml}


def _alone(setup, task: str, adapter: str | None) -> dict:
    """`loraforge eval` of one model on one task: its metrics and outputs."""
    recipe, _, columns, file_format = TASKS[task]
    cfg = EvalConfig(data=str(setup["files"][task]), recipe=recipe, columns=columns, file_format=file_format,
                     model=str(setup["llama"]), adapters=(adapter,) if adapter else (), max_new_tokens=6,
                     batch_size=2, output=str(setup["root"] / "alone" / f"{task}-{Path(adapter or 'base').name}"))
    model = run_eval(cfg).models[-1]
    return {"metrics": model.metrics, "outputs": [r["output"] for r in model.rows]}


def _outputs(setup, row: str, task: str) -> list[str]:
    lines = (setup["root"] / "report" / task / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["output"] for r in map(json.loads, lines) if r["model"] == row]


@pytest.mark.parametrize("task", list(TASKS))
def test_each_row_equals_that_model_alone_on_that_task(setup, task) -> None:
    result = setup["result"]
    for row, adapter in ((BASE, None), (SINGLE, setup["singles"][task]), ("cat", setup["joint"])):
        alone = _alone(setup, task, str(adapter) if adapter else None)
        assert _outputs(setup, row, task) == alone["outputs"], (row, task)
        assert result.row(row).metrics[task] == pytest.approx(alone["metrics"], abs=1e-12)


def test_routed_row_is_each_example_on_its_route(setup) -> None:
    result = setup["result"]
    routed = result.row("routed")
    for task in TASKS:
        rows = [json.loads(line) for line in
                (setup["root"] / "report" / task / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        by_model = {}
        for r in rows:
            by_model.setdefault(r["model"], []).append(r["output"])
        assert len(by_model["routed"]) == len(by_model[SINGLE])
        # trained on these very prompts, the router sends every one to its own task: routed == single
        assert routed.routed_right[task] == 1.0
        assert by_model["routed"] == by_model[SINGLE]
        assert routed.scores[task] == result.row(SINGLE).scores[task]
    assert routed.tokens == result.row(SINGLE).tokens


def test_ner_parse_share_counts_well_formed_entity_lists(setup) -> None:
    result = setup["result"]
    rows = [json.loads(line) for line in
            (setup["root"] / "report" / "ner" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    for row in result.rows:
        outputs = [r for r in rows if r["model"] == row.name]
        assert row.parses["ner"] == sum(r["parses"] for r in outputs) / len(outputs)
    tokens = "EU rejects German call to boycott British lamb .".split()
    kinds = ["PER", "ORG", "LOC", "MISC"]
    assert entities_parse("EU: ORG; German: MISC; British: MISC", tokens, kinds)
    assert entities_parse(" none ", tokens, kinds)
    assert not entities_parse("EU: ORG; Germany: LOC", tokens, kinds)  # words not in the sentence
    assert not entities_parse("EU: COMPANY", tokens, kinds)  # an unknown type
    assert not entities_parse("EU: ORG;", tokens, kinds)  # an empty item
    assert not entities_parse("The entities are EU (ORG)", tokens, kinds)


def test_ratios_and_gain_kept_are_the_closed_form() -> None:
    tasks = [TaskSpec(name=n, recipe="sst2", data="x", adapter="y") for n in ("a", "b", "c")]
    rows = [RowResult(BASE, None, scores={"a": 0.5, "b": 0.2, "c": 0.4}),
            RowResult(SINGLE, None, scores={"a": 0.9, "b": 0.6, "c": 0.3}),  # c: tuning did not help
            RowResult("joint", "j", scores={"a": 0.8, "b": 0.5, "c": 0.35})]
    result = MultiTaskResult(tasks, {"a": "accuracy", "b": "accuracy", "c": "accuracy"}, rows, "base", [1, 1, 1])
    joint = result.row("joint")
    assert result.ratio(joint, "a") == pytest.approx(0.8 / 0.9)
    assert result.gain_kept(joint, "a") == pytest.approx(0.3 / 0.4)
    assert result.gain_kept(joint, "b") == pytest.approx(0.3 / 0.4)
    assert math.isnan(result.gain_kept(joint, "c"))  # undefined, left out of the mean and the worst
    assert result.summary(joint)["mean_gain_kept"] == pytest.approx(0.75)
    assert result.summary(joint)["worst_gain_kept"] == pytest.approx(0.75)
    assert result.summary(joint)["mean_ratio"] == pytest.approx((0.8 / 0.9 + 0.5 / 0.6 + 0.35 / 0.3) / 3)


def test_files_hold_the_table_plots_and_each_task_report(setup) -> None:
    out = setup["root"] / "report"
    data = json.loads((out / "multitask.json").read_text(encoding="utf-8"))
    assert [r["name"] for r in data["rows"]] == [BASE, SINGLE, "cat", "routed"]
    assert data["primary"] == {"d2t": "bleu", "sent": "accuracy", "ner": "f1"}
    page = (out / "multitask.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2
    md = (out / "multitask.md").read_text(encoding="utf-8")
    assert "| routed |" in md and "mean gain kept" in md and "ner parses" in md
    for task in TASKS:
        assert (out / task / "report.html").is_file() and (out / task / "results.json").is_file()


def _bad(setup, tmp_path, change) -> str:
    listing = yaml.safe_load(setup["yaml"].read_text(encoding="utf-8"))
    change(listing)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(listing, sort_keys=False), encoding="utf-8")
    with pytest.raises(LoraforgeError) as err:
        read_task_list(path)
    return str(err.value)


def test_task_list_problems_name_the_file_line_and_field(setup, tmp_path, capsys) -> None:
    message = _bad(setup, tmp_path, lambda d: d["tasks"][1].update(recipie="sst2"))
    assert "bad.yaml, line " in message and "tasks[1].recipie: unknown key" in message
    message = _bad(setup, tmp_path, lambda d: d["tasks"][0].update(name="../escape"))
    assert "tasks[0].name" in message and "is not a name" in message
    message = _bad(setup, tmp_path, lambda d: d["tasks"][2].pop("adapter"))
    assert "tasks[2].adapter: missing" in message
    assert "models.d2t: is also a task's name" in _bad(setup, tmp_path, lambda d: d["models"].update(d2t="x"))
    assert "tasks[0].max_new_tokens" in _bad(setup, tmp_path, lambda d: d["tasks"][0].update(max_new_tokens=0))
    assert "not found" in _bad(setup, tmp_path, lambda d: d["tasks"][0].update(data=str(tmp_path / "none.csv")))
    (tmp_path / "bad.yaml").write_text("tasks: [", encoding="utf-8")
    assert main(["eval", "--tasks", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["eval", "--tasks", str(setup["yaml"]), "--data", "x.csv"]) == 2
    assert "drop --data" in capsys.readouterr().err


def test_cli_prints_the_table(setup, tmp_path, capsys) -> None:
    listing = yaml.safe_load(setup["yaml"].read_text(encoding="utf-8"))
    listing["tasks"] = listing["tasks"][:1]
    listing.pop("router")
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(listing), encoding="utf-8")
    assert main(["eval", "--tasks", str(path), "--output", str(tmp_path / "o"), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("model | d2t (bleu) | mean gain kept")
    assert [line.split(" | ")[0] for line in out.splitlines()[1:4]] == [BASE, SINGLE, "cat"]
    assert replace(setup["cfg"], output="x").tasks == str(setup["yaml"])
