"""`loraforge predict`: every task's output is scorable by its metric (encoder heads, and decoder recipes sst2,
conll2003, e2e, squad on tiny models and real fixture rows), batched generation equals one-by-one, and mistakes
end in exit code 2 with a message that says what to do."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from fixtures.tiny_bert import CONLL, SST2, save_tiny_bert
from loraforge.cli import main
from loraforge.config import TrainConfig
from loraforge.data import get_recipe, read_records
from loraforge.metrics import METRICS, accuracy_macro_f1, entity_f1
from helpers import session_of
from loraforge.infer.predict import predict_file, predict_generative
from loraforge.lora import LoraConfig, LoraModel, save_adapter
from loraforge.models import load_model
from loraforge.train import train as train_head  # the one loop trains heads too

READERS = Path(__file__).parent / "fixtures" / "readers"
E2E = READERS / "e2e_train_head.csv"
HEAD_OPTIONS = dict(r=4, lora_alpha=8, lora_dropout=0.0, lr=1e-2, batch_size=2, max_steps=3, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def seq_head(bert_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seq_head")
    train_head(TrainConfig(model=str(bert_dir), task="seq-cls", data=str(SST2), columns={"text": "sentence"},
                           output=str(out), **HEAD_OPTIONS), progress=False)
    return out


@pytest.fixture(scope="module")
def token_head(bert_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("token_head")
    train_head(TrainConfig(model=str(bert_dir), task="token-cls", data=str(CONLL), file_format="conll",
                           output=str(out), **HEAD_OPTIONS), progress=False)
    return out


@pytest.fixture(scope="module")
def causal_adapter(llama_dir, tmp_path_factory) -> Path:
    model, _ = load_model(str(llama_dir))
    torch.manual_seed(0)
    lm = LoraModel(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                     init_lora_weights=False, base_model_name_or_path=str(llama_dir)))
    return save_adapter(lm, tmp_path_factory.mktemp("causal_adapter"))


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory) -> Path:
    """The squad record of the data goldens (tests/golden/data/make_golden.py), as a JSONL file."""
    spec = importlib.util.spec_from_file_location("golden_cases", Path(__file__).parent / "golden" / "data" /
                                                  "make_golden.py")
    golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(golden)
    path = tmp_path_factory.mktemp("squad") / "squad.jsonl"
    path.write_text(json.dumps(golden.RECIPE_RECORDS["squad"]) + "\n", encoding="utf-8")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _printed_scores(out: str) -> dict[str, float]:
    line = next(line for line in out.splitlines() if " on " in line and "records:" in line)
    return {k: float(v) for k, v in re.findall(r"(\w+) (-?[\d.]+|nan)", line.split("records:", 1)[1])}


# ---- encoder heads -----------------------------------------------------------------------------------------------
def test_seq_cls_predictions_are_written_and_scored(seq_head, tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", "--adapter", str(seq_head), "--data", str(SST2), "--output", str(preds)]) == 0
    rows = _lines(preds)
    assert [r["where"] for r in rows] == [f"{SST2}:{n}" for n in (2, 3, 4, 5)]
    assert [r["reference"] for r in rows] == ["0", "0", "1", "0"]
    assert all(r["prediction"] in ("0", "1") for r in rows)
    for r in rows:  # every label's probability: they sum to 1, and the prediction is the likeliest
        assert set(r["probabilities"]) == {"0", "1"} and sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert r["prediction"] == max(r["probabilities"], key=r["probabilities"].get)
    rescored = accuracy_macro_f1([r["prediction"] for r in rows], [r["reference"] for r in rows], labels=["0", "1"])
    printed = _printed_scores(capsys.readouterr().out)
    assert printed == pytest.approx({k: round(v, 4) for k, v in rescored.items()}, abs=1e-4)


def test_token_cls_predicts_one_bio_tag_per_word(token_head, tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", "--adapter", str(token_head), "--data", str(CONLL), "--file-format", "conll",
                 "--output", str(preds), "--max-length", "6"]) == 0  # words past 6 tokens are tagged O
    rows = _lines(preds)
    tokens = [r.fields["tokens"] for r in read_records(CONLL, "conll")]
    assert [len(r["prediction"]) for r in rows] == [len(t) for t in tokens]
    assert rows[1]["reference"] == ["B-PER", "I-PER"]  # IOB1 in the file, BIO out
    rescored = entity_f1([r["prediction"] for r in rows], [r["reference"] for r in rows])
    out = capsys.readouterr().out
    assert "seqeval on 4 records" in out
    assert _printed_scores(out) == pytest.approx({k: round(v, 4) for k, v in rescored.items()}, abs=1e-4)


def test_records_without_labels_are_predicted_not_scored(seq_head, tmp_path, capsys):
    data = tmp_path / "unlabelled.jsonl"
    data.write_text('{"sentence": "a charming journey"}\n{"sentence": "labored gags"}\n', encoding="utf-8")
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", "--adapter", str(seq_head), "--data", str(data), "--output", str(preds)]) == 0
    assert [set(r) for r in _lines(preds)] == [{"where", "prediction", "probabilities"}] * 2  # no reference
    assert "nothing is scored" in capsys.readouterr().out


def test_max_examples_takes_the_first_records(seq_head):
    result = predict_file(SST2, adapter=seq_head, max_examples=2)
    assert [p.where for p in result.predictions] == [f"{SST2}:2", f"{SST2}:3"] and result.scored == 2


# ---- decoder recipes ---------------------------------------------------------------------------------------------
DECODER_CASES = {  # recipe: (data, file format, the metric's keys)
    "sst2": (SST2, None, {"accuracy", "macro_f1", "invalid"}),
    "conll2003": (CONLL, "conll", {"precision", "recall", "f1"}),
    "e2e": (E2E, None, {"bleu", "nist"}),
    "squad": ("SQUAD", None, {"exact_match", "f1"}),
}


@pytest.mark.parametrize("recipe", DECODER_CASES)
def test_decoder_recipe_predictions_are_scorable_by_the_recipe_metric(recipe, llama_dir, squad_file, tmp_path):
    data, file_format, keys = DECODER_CASES[recipe]
    data = squad_file if data == "SQUAD" else data
    preds = tmp_path / "preds.jsonl"
    result = predict_file(data, model=str(llama_dir), recipe=recipe, file_format=file_format, max_new_tokens=6,
                          batch_size=3, output=preds)
    n = sum(1 for _ in read_records(data, file_format))
    assert result.scored == len(result.predictions) == n and set(result.scores) == keys
    rows = _lines(preds)
    assert all({"where", "prediction", "reference", "generated"} <= set(r) for r in rows)
    metric = METRICS[get_recipe(recipe).metric]
    options = {"labels": ["negative", "positive"]} if recipe == "sst2" else {}
    rescored = metric([r["prediction"] for r in rows], [r["reference"] for r in rows], **options)
    assert rescored == pytest.approx(result.scores, nan_ok=True)


def test_decoder_with_an_adapter_uses_its_base(causal_adapter, capsys):
    assert main(["predict", "--adapter", str(causal_adapter), "--recipe", "sst2", "--data", str(SST2),
                 "--max-new-tokens", "4"]) == 0
    assert "accuracy_macro_f1 on 4 records" in capsys.readouterr().out


def test_batched_generation_equals_one_by_one(llama_dir):
    model, tokenizer = load_model(str(llama_dir))
    records = list(read_records(CONLL, "conll"))  # sentences of 9, 2, 2 and 10 words: left padding matters
    recipe = get_recipe("conll2003")
    session = session_of(model, tokenizer)
    batched = predict_generative(session, recipe, records, max_new_tokens=8, batch_size=4)
    single = predict_generative(session, recipe, records, max_new_tokens=8, batch_size=1)
    assert [p.generated for p in batched] == [p.generated for p in single]
    assert [len(p.prediction) for p in batched] == [len(r.fields["tokens"]) for r in records]


# ---- mistakes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, words", [
    (["--model", "BERT", "--adapter", "CAUSAL", "--task", "seq-cls"], "no labels.json, so it is not a seq-cls"),
    (["--model", "BERT", "--adapter", "CAUSAL", "--recipe", "sst2"], "is an encoder: it cannot write answers"),
    (["--model", "LLAMA", "--adapter", "SEQ", "--task", "seq-cls"], "is a decoder"),
    (["--adapter", "SEQ", "--task", "token-cls"], "is a seq-cls head"),
    (["--model", "LLAMA"], "predict needs --recipe"),
    (["--model", "LLAMA", "--recipe", "lm"], "no answers to predict"),
    (["--task", "seq-cls", "--model", "BERT"], "give --adapter"),
    (["--adapter", "SEQ", "--recipe", "e2e"], "cannot feed a seq-cls head"),
    (["--adapter", "SEQ", "--batch-size", "0"], "--batch-size must be a whole number >= 1"),
])
def test_predict_mistakes_exit_2(flags, words, bert_dir, llama_dir, causal_adapter, seq_head, capsys):
    names = {"BERT": str(bert_dir), "LLAMA": str(llama_dir), "CAUSAL": str(causal_adapter), "SEQ": str(seq_head)}
    assert main(["predict", "--data", str(SST2), *[names.get(f, f) for f in flags]]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_unknown_label_in_the_data_names_file_line_and_labels(seq_head, tmp_path, capsys):
    data = tmp_path / "dev.jsonl"
    data.write_text('{"sentence": "fine", "label": 1}\n{"sentence": "so so", "label": "neutral"}\n',
                    encoding="utf-8")
    assert main(["predict", "--adapter", str(seq_head), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2" in err and "'neutral'" in err and "allowed labels: 0, 1" in err
