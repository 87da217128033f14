"""`loraforge eval`: base, few-shot and two adapters on the same records, multi-reference grouping, perplexity."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fixtures.tiny_models import save_tiny_llama, tiny_tokenizer, write_jsonl
from loraforge.cli import main
from loraforge.data import RECIPES, Record, collate, load_examples, pad_id_for
from loraforge.errors import LoraforgeError
from loraforge.eval.fewshot import encode_few_shot, few_shot_text, pick_shots
from loraforge.eval.config import EvalConfig
from loraforge.infer import engine as engine_module
from loraforge.eval.run import load_eval_examples, run_eval
from loraforge.infer.predict import predict_file
from loraforge.infer.score import token_nll
from helpers import hf_generate
from loraforge.lora import LoraConfig, LoraModel, load_adapter, save_adapter
from loraforge.data.tokenize import tokenize_example
from loraforge.models import load_model

torch.set_num_threads(1)  # tiny models gain nothing from threads; other test runs share the 2 cores

A, B, C, D = ("name river pub food english", "name city coffee shop rating high", "name the shop food italian",
              "name river restaurant family friendly yes")
# E2E-like: an MR once per reference, consecutive. Words from the tiny vocabulary.
DEV = [
    {"mr": A, "ref": "the river pub is an english pub"}, {"mr": A, "ref": "an english pub near the river"},
    {"mr": B, "ref": "the city coffee shop has a high rating"},
    {"mr": C, "ref": "the shop is italian"}, {"mr": C, "ref": "an italian shop"}, {"mr": C, "ref": "the shop"},
    {"mr": D, "ref": "the river restaurant is family friendly"},
]
POOL = [  # the few-shot pool holds a scored MR (A), which must never be shown
    {"mr": "name the pub food cheap", "ref": "the pub is cheap"}, {"mr": A, "ref": "the river pub"},
    {"mr": "name city restaurant rating low", "ref": "a city restaurant with low rating"},
    {"mr": "name the coffee shop", "ref": "the coffee shop"}, {"mr": "name the coffee shop", "ref": "a coffee shop"},
    {"mr": "name river shop food english", "ref": "the river shop is english"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    llama = save_tiny_llama(root / "llama", seed=0)
    paths = {"llama": llama, "dev": write_jsonl(root / "dev.jsonl", DEV),
             "pool": write_jsonl(root / "pool.jsonl", POOL)}
    for name, seed in (("adapter_a", 1), ("adapter_b", 2)):
        model, _ = load_model(str(llama))
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False, base_model_name_or_path=str(llama))
        paths[name] = save_adapter(LoraModel(model, config), root / name)
    # adapter_a as `loraforge train` leaves it: a metrics.jsonl beside the adapter, for the loss-curve plot
    rows = [{"step": s, "loss": 3.0 / s} for s in range(1, 6)] + [{"step": 5, "val_loss": 0.9}]
    (paths["adapter_a"] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@pytest.fixture(scope="module")
def result(setup, tmp_path_factory):
    cfg = EvalConfig(data=str(setup["dev"]), recipe="e2e", adapters=(str(setup["adapter_a"]), str(setup["adapter_b"])),
                     few_shot=2, few_shot_data=str(setup["pool"]), max_new_tokens=8, batch_size=3, samples=3,
                     output=str(tmp_path_factory.mktemp("out") / "report"))
    return run_eval(cfg)


def test_records_sharing_an_input_are_one_example_with_all_references(setup) -> None:
    examples = load_eval_examples(str(setup["dev"]), RECIPES["e2e"])
    assert [ex.record.fields["mr"] for ex in examples] == [A, B, C, D]
    assert examples[2].references == ["the shop is italian", "an italian shop", "the shop"]
    assert [len(ex.records) for ex in examples] == [2, 1, 3, 1]
    first_two = load_eval_examples(str(setup["dev"]), RECIPES["e2e"], max_examples=2)
    assert [len(ex.references) for ex in first_two] == [2, 1]


def test_results_json_has_one_row_per_model_with_numbers(result) -> None:
    data = json.loads(result.files["results"].read_text())
    assert [m["name"] for m in data["models"]] == ["base", "base 2-shot", "adapter_a", "adapter_b"]
    assert data["examples"] == 4 and data["records"] == 7 and data["metric"] == "bleu_nist"
    for row in data["models"]:
        assert set(row["metrics"]) == {"bleu", "nist"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in row["metrics"].values())
        assert row["n"] == 4 and row["seconds"] > 0 and row["tokens"] > 0 and row["tokens_per_second"] > 0
    lines = result.files["predictions"].read_text().splitlines()
    assert len(lines) == 4 * 4
    first = json.loads(lines[0])
    assert first["model"] == "base" and first["input"] == A and first["references"] == [DEV[0]["ref"], DEV[1]["ref"]]


def test_each_row_is_its_model_alone(setup, result) -> None:
    """The base row is the plain base (no adapter leaked into it) and each adapter row is that adapter alone."""
    outputs = {m.name: [r["output"] for r in m.rows] for m in result.models}
    tokenizer = tiny_tokenizer()
    prompt = RECIPES["e2e"].encode_prompt(Record(DEV[3], "dev", 4), tokenizer)  # example 2 starts at record 3
    def text(model) -> str:
        return tokenizer.decode(hf_generate(model, tokenizer, prompt, 8), skip_special_tokens=True).strip()

    base, _ = load_model(str(setup["llama"]))
    assert outputs["base"][2] == text(base)
    for name in ("adapter_a", "adapter_b"):
        model, _ = load_model(str(setup["llama"]))
        load_adapter(model, setup[name])
        assert outputs[name][2] == text(model)
    assert outputs["adapter_a"] != outputs["base"] and outputs["adapter_b"] != outputs["adapter_a"]


def test_base_false_scores_the_other_rows_alone_and_the_same(setup, result, tmp_path) -> None:
    """`--base false` leaves out the zero-shot row; the rows left are what the full run gave them."""
    cfg = EvalConfig(data=str(setup["dev"]), recipe="e2e", adapters=(str(setup["adapter_a"]),), base=False,
                     few_shot=2, few_shot_data=str(setup["pool"]), max_new_tokens=8, batch_size=3,
                     output=str(tmp_path / "o"))
    alone = run_eval(cfg)
    full = {m.name: m for m in result.models}
    assert [m.name for m in alone.models] == ["base 2-shot", "adapter_a"]
    for row in alone.models:
        assert [r["output"] for r in row.rows] == [r["output"] for r in full[row.name].rows]
        assert row.metrics == full[row.name].metrics
    with pytest.raises(LoraforgeError, match="nothing to score"):
        EvalConfig(data=str(setup["dev"]), recipe="e2e", base=False)
    assert main(["eval", "--data", str(setup["dev"]), "--recipe", "e2e", "--base", "false"]) == 2


def test_few_shot_prompt_has_k_examples_and_no_scored_record(setup) -> None:
    recipe = replace(RECIPES["e2e"], prompt_style="instruction")  # Alpaca with this tokenizer
    examples = load_eval_examples(str(setup["dev"]), recipe)
    scored = [recipe.prompt(ex.record) for ex in examples]
    pool = [Record(r, "pool", i + 1) for i, r in enumerate(POOL)]
    for k in (1, 3, 4):
        shots = pick_shots(pool, recipe, k, seed=0, exclude=scored)
        assert len(shots) == k
        assert not {recipe.prompt(s) for s in shots} & set(scored)
        assert len({s.fields["mr"] for s in shots}) == k  # one shot per input, no repeated MR
        text = few_shot_text(recipe, shots, examples[1].record, tiny_tokenizer())
        assert text.count("### Response:") == k + 1  # K solved examples, then the one to answer
        assert text.count(recipe.instruction) == k + 1
        assert A not in text and text.endswith(f"### Input:\n{B}\n\n### Response:\n")
        for shot in shots:
            assert f"{shot.fields['mr']}\n\n### Response:\n{recipe.target(shot)}\n\n" in text
    assert pick_shots(pool, recipe, 2, seed=0, exclude=scored) == pick_shots(pool, recipe, 2, seed=0, exclude=scored)
    with pytest.raises(LoraforgeError, match="only 4"):  # 6 records, minus the scored MR and a repeated one
        pick_shots(pool, recipe, 5, seed=0, exclude=scored)
    ids = encode_few_shot(recipe, shots, examples[1].record, tiny_tokenizer())
    assert ids[0] == tiny_tokenizer().bos_token_id and ids.count(tiny_tokenizer().bos_token_id) == 1
    plain = RECIPES["e2e"]  # the "plain" style: input, newline, target; shots apart by a blank line
    text = few_shot_text(plain, shots, examples[1].record, tiny_tokenizer())
    assert text == "".join(f"{s.fields['mr']}\n{plain.target(s)}\n\n" for s in shots) + f"{B}\n"


def test_few_shot_with_chat_template_has_k_turn_pairs(setup) -> None:
    from loraforge.data import CHATML_TEMPLATE

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE
    recipe = replace(RECIPES["e2e"], prompt_style="instruction")
    shots = pick_shots([Record(r, "pool", i + 1) for i, r in enumerate(POOL)], recipe, 3, seed=1, exclude=[])
    text = few_shot_text(recipe, shots, Record(DEV[0], "dev", 1), tokenizer)
    assert text.count("<|im_start|>user") == 4 and text.count("<|im_start|>assistant") == 4
    assert text.endswith(f"{A}<|im_end|>\n<|im_start|>assistant\n")
    plain = few_shot_text(RECIPES["e2e"], shots, Record(DEV[0], "dev", 1), tokenizer)  # a plain recipe: no turns
    assert "<|im_start|>" not in plain and plain.endswith(f"\n\n{A}\n")


def test_perplexity_is_token_weighted_and_matches_transformers(setup, tmp_path) -> None:
    """Per-example NLL from the chunked head equals transformers' own loss; the total is a token-weighted mean."""
    data = write_jsonl(tmp_path / "text.jsonl")  # text and instruction records: all text, or the response, learned
    model, tokenizer = load_model(str(setup["llama"]))
    examples, _ = load_examples(data, tokenizer, 64)
    batch = collate(examples, pad_id_for(tokenizer))
    nll, count = token_nll(model, batch)
    with torch.no_grad():
        for k, ex in enumerate(examples):
            one = collate([ex], pad_id_for(tokenizer))
            assert float(nll[k]) / int(count[k]) == pytest.approx(float(model(**one).loss), rel=1e-5)
    out = run_eval(EvalConfig(data=str(data), model=str(setup["llama"]), batch_size=2, output=str(tmp_path / "o")))
    metrics = out.models[0].metrics
    assert metrics["tokens"] == int(count.sum())
    assert metrics["perplexity"] == pytest.approx(math.exp(float(nll.sum()) / int(count.sum())), rel=1e-6)
    md = out.files["report_md"].read_text()
    assert "| model | perplexity | nll_per_token | tokens |" in md and "## Samples" not in md


def test_cli_eval_classification_prints_table(setup, tmp_path, capsys) -> None:
    rows = [{"sentence": "the food is cheap", "label": "1"}, {"sentence": "the pub is low", "label": "0"},
            {"sentence": "high rating", "label": "1"}]
    data = write_jsonl(tmp_path / "sst.jsonl", rows)
    code = main(["eval", "--model", str(setup["llama"]), "--adapter", str(setup["adapter_b"]), "--data", str(data),
                 "--recipe", "sst2", "--max-new-tokens", "3", "--max-examples", "2", "--output", str(tmp_path / "o")])
    assert code == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro_f1" in out and "adapter_b" in out
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [m["n"] for m in data["models"]] == [2, 2]
    assert set(data["models"][0]["metrics"]) == {"accuracy", "macro_f1", "invalid"}


def test_bad_options_are_user_errors(setup) -> None:
    with pytest.raises(LoraforgeError, match="few-shot-data"):
        EvalConfig(data=str(setup["dev"]), recipe="e2e", few_shot=2)
    with pytest.raises(LoraforgeError, match="needs a task recipe"):
        EvalConfig(data=str(setup["dev"]), task="generate")
    assert main(["eval", "--data", str(setup["dev"]), "--recipe", "e2e", "--num-beams", "0"]) == 2


# ---- label-word scoring ------------------------------------------------------------------------------------------
QA = [{"question": "is the pub cheap", "context": "the pub is cheap", "label": "yes"},
      {"question": "is the shop italian", "context": "the shop is english", "label": "no"},
      {"question": "is the river near", "context": "the river is near the city", "label": "maybe"}]


@pytest.mark.parametrize("shared_min", [1, 10**9], ids=["prompts' shared prefix run once", "every row whole"])
def test_label_words_answer_the_likeliest_label(setup, tmp_path, monkeypatch, shared_min) -> None:
    monkeypatch.setattr(engine_module, "SHARED_PREFIX_MIN", shared_min)
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    cfg = EvalConfig(data=str(data), recipe="pubmedqa", answer="label-words", adapters=(str(setup["adapter_a"]),),
                     model=str(setup["llama"]), batch_size=4, output=str(tmp_path / "report"))
    result = run_eval(cfg)
    recipe = RECIPES["pubmedqa"]
    for row in result.models:
        model, tokenizer = load_model(str(setup["llama"]))
        if row.adapter:
            load_adapter(model, setup["adapter_a"])
        expected = []
        for i, fields in enumerate(QA):
            record = Record(fields, str(data), i + 1)
            prompt = recipe.encode_prompt(record, tokenizer)
            scores = {}
            for name in recipe.names:  # log P(the label's tokens and end | prompt), by hand
                taught = Record({**fields, "label": name}, str(data), i + 1)
                ids = tokenize_example(recipe.to_example(taught, tokenizer), tokenizer, 10**6).input_ids
                with torch.no_grad():
                    logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
                scores[name] = sum(logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))
            expected.append(max(scores, key=scores.get))
            total = torch.tensor(list(scores.values()), dtype=torch.float64).softmax(0).tolist()
            assert row.rows[i]["probabilities"] == pytest.approx(dict(zip(scores, total)), abs=1e-5)
        assert [r["parsed"] for r in row.rows] == expected, row.name
    assert "label-word scoring" in (tmp_path / "report" / "report.md").read_text()


def test_label_words_need_a_classification_recipe(setup, tmp_path) -> None:
    with pytest.raises(LoraforgeError, match="label-words scores the label names of a classification recipe"):
        EvalConfig(data=str(setup["dev"]), recipe="e2e", answer="label-words")


def test_predict_answers_by_label_words_as_eval_does(setup, tmp_path, capsys) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    cfg = EvalConfig(data=str(data), recipe="pubmedqa", answer="label-words", adapters=(str(setup["adapter_a"]),),
                     model=str(setup["llama"]), base=False, batch_size=4)
    rows = run_eval(cfg).models[0].rows  # checked against log-probabilities by hand above
    result = predict_file(data, model=str(setup["llama"]), adapter=setup["adapter_a"], recipe="pubmedqa",
                          answer="label-words", batch_size=4, output=tmp_path / "p.jsonl")
    assert [p.prediction for p in result.predictions] == [r["parsed"] for r in rows]
    assert [p.probabilities for p in result.predictions] == [r["probabilities"] for r in rows]
    written = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [w["probabilities"] for w in written] == [r["probabilities"] for r in rows]
    assert result.scores["invalid"] == 0.0
    assert main(["predict", "--data", str(data), "--model", str(setup["llama"]), "--recipe", "e2e",
                 "--answer", "label-words"]) == 2
    assert "label-words scores the label names of a classification recipe" in capsys.readouterr().err
