"""Encoders with task heads: records -> ids and aligned labels, the training loop, and adapters that `peft` reloads
with the same logits (task_type SEQ_CLS / TOKEN_CLS, the head in modules_to_save)."""
from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from fixtures.tiny_bert import CONLL, SST2, save_tiny_bert, tiny_bert_tokenizer
from fixtures.tiny_models import save_tiny_llama
from helpers import tiny_bert_cls
from loraforge.cli import main
from loraforge.config import TrainConfig
from loraforge.data import IGNORE_INDEX, Record, read_records
from loraforge.data.encode import HeadSpec, collate_head
from loraforge.errors import LoraforgeError
from loraforge.heads import run_head
from loraforge.infer import InferenceSession
from loraforge.lora import LoraConfig, LoraModel
from loraforge.train import loop
from loraforge.train import train as train_head  # the one loop trains heads too
from tolerances import FP32, max_abs_diff

X = IGNORE_INDEX
OPTIONS = dict(r=4, lora_alpha=8, lora_dropout=0.0, lr=1e-2, batch_size=2, max_steps=4, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _cfg(bert_dir: Path, output: Path, task: str = "seq-cls", **overrides) -> TrainConfig:
    data = dict(data=str(SST2), columns={"text": "sentence"}) if task == "seq-cls" else \
        dict(data=str(CONLL), file_format="conll")
    return TrainConfig(model=str(bert_dir), task=task, output=str(output), **{**data, **OPTIONS, **overrides})


@pytest.fixture(scope="module")
def seq_run(bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("seq_run")
    return out, train_head(_cfg(bert_dir, out), progress=False)


@pytest.fixture(scope="module")
def token_run(bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("token_run")
    return out, train_head(_cfg(bert_dir, out, "token-cls", lora_dropout=0.1), progress=False)  # must be off in eval


def _rec(fields: dict, line: int = 7) -> Record:
    return Record(fields=fields, source="dev.jsonl", line=line)


# ---- encoding ----------------------------------------------------------------------------------------------------
def test_seq_cls_labels_from_the_data_and_ids_with_cls_and_sep():
    records = list(read_records(SST2))
    spec = HeadSpec.from_records("seq-cls", records, columns={"text": "sentence"})
    assert spec.labels == ("0", "1")
    tok = tiny_bert_tokenizer()
    example = spec.encode(records[2], tok, max_length=64)  # "that loves its characters ..." 1
    assert example.target == [1] and example.reference == "1"
    assert example.input_ids == tok("that loves its characters and communicates something rather beautiful about "
                                    "human nature ")["input_ids"]
    assert example.input_ids[0] == tok.cls_token_id and example.input_ids[-1] == tok.sep_token_id
    cut = spec.encode(records[2], tok, max_length=5)
    assert cut.truncated and len(cut.input_ids) == 5 and cut.input_ids[-1] == tok.sep_token_id


def test_recipe_gives_label_names_and_columns():
    spec = HeadSpec.from_records("seq-cls", [], recipe="sst2")
    assert spec.labels == ("negative", "positive")
    example = spec.encode(next(iter(read_records(SST2))), tiny_bert_tokenizer(), 64)
    assert (example.reference, example.target) == ("negative", [0])


def test_token_labels_on_the_first_sub_token_only_and_iob1_becomes_bio():
    spec = HeadSpec.from_records("token-cls", read_records(CONLL, "conll"))
    # O first, then B-/I- per type, both even where the data has only I- (IOB1)
    assert spec.labels == ("O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER")
    tok = tiny_bert_tokenizer()
    record = _rec({"tokens": ["Peter", "Blackburn", "rejects", "1996-08-22"],
                   "ner_tags": ["I-PER", "I-PER", "O", "O"]})
    example = spec.encode(record, tok, max_length=64)
    pieces = tok.convert_ids_to_tokens(example.input_ids)
    assert pieces == ["[CLS]", "peter", "blac", "##kburn", "reje", "##cts", "1996", "-", "08", "-", "22", "[SEP]"]
    b_per, i_per, o = spec.labels.index("B-PER"), spec.labels.index("I-PER"), 0
    assert example.target == [X, b_per, i_per, X, o, X, o, X, X, X, X, X]
    assert example.word_starts == [1, 2, 4, 6]
    assert example.reference == ["B-PER", "I-PER", "O", "O"]
    cut = spec.encode(record, tok, max_length=5)  # [CLS] peter blac ##kburn [SEP]: the last two words are cut
    assert cut.truncated and cut.word_starts == [1, 2, -1, -1] and cut.target == [X, b_per, i_per, X, X]


def test_collate_pads_ids_and_labels():
    spec = HeadSpec("token-cls", ("O", "B-PER", "I-PER"))
    tok = tiny_bert_tokenizer()
    a = spec.encode(_rec({"tokens": ["Peter"], "ner_tags": ["B-PER"]}), tok, 64)
    b = spec.encode(_rec({"tokens": ["Peter", "Blackburn"], "ner_tags": ["B-PER", "I-PER"]}), tok, 64)
    batch = collate_head([a, b], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[X, 1, X, X, X], [X, 1, 2, X, X]]
    seq = HeadSpec("seq-cls", ("0", "1"))
    batch = collate_head([seq.encode(_rec({"text": "a b", "label": 1}), tok, 64)], pad_id=0)
    assert batch["labels"].tolist() == [1]


def test_unknown_label_names_file_line_and_allowed_labels():
    spec = HeadSpec("seq-cls", ("0", "1"), columns={"text": "sentence"})
    with pytest.raises(LoraforgeError, match=r'dev.jsonl:7: field "label" has label \'2\'.*allowed labels: 0, 1'):
        spec.encode(_rec({"sentence": "fine", "label": 2}), tiny_bert_tokenizer(), 64)
    ner = HeadSpec("token-cls", ("O", "B-PER", "I-PER"))
    with pytest.raises(LoraforgeError, match=r"dev.jsonl:7: .*'B-ORG'.*allowed labels: O, B-PER, I-PER"):
        ner.encode(_rec({"tokens": ["EU"], "ner_tags": ["I-ORG"]}), tiny_bert_tokenizer(), 64)


def test_labels_file_round_trip(tmp_path):
    spec = HeadSpec("seq-cls", ("negative", "positive"), "sst2", {"text": "review"})
    spec.save(tmp_path)
    assert HeadSpec.load(tmp_path) == spec
    data = json.loads((tmp_path / "labels.json").read_text())
    assert data["id2label"] == {"0": "negative", "1": "positive"} and data["num_labels"] == 2


# ---- task_type adds the head to modules_to_save, as PEFT does -----------------------------------------------------
@pytest.mark.parametrize("given", [None, ["pooler"], ["classifier"]])
def test_seq_cls_task_type_saves_the_head_like_peft(given, tmp_path):
    ours = LoraModel(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS",
                                                 modules_to_save=given))
    assert "classifier" in ours.saved_modules
    theirs = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS",
                                                                  modules_to_save=given))
    theirs.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    assert ours.config.modules_to_save == list(dict.fromkeys(saved))  # peft repeats "classifier" if given twice
    assert {"base_model.model." + k for k in ours.adapter_parameters()} == set(
        load_file(tmp_path / "adapter_model.safetensors"))


def test_causal_lm_task_type_adds_no_head():
    lm = LoraModel(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"], task_type="CAUSAL_LM"))
    assert lm.config.modules_to_save is None and not lm.saved_modules


# ---- training ----------------------------------------------------------------------------------------------------
def test_seq_cls_run_writes_peft_adapter_labels_and_summary(seq_run):
    out, result = seq_run
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert any(k.endswith("attention.self.query.lora_A.weight") for k in keys)  # bert's default targets
    assert json.loads((out / "labels.json").read_text())["id2label"] == {"0": "0", "1": "1"}
    summary = json.loads((out / "train_summary.json").read_text())
    for name in ("steps", "train_tokens", "train_seconds", "tokens_per_second", "final_loss", "peak_rss_mb",
                 "trainable_params"):
        assert summary[name] == result.summary[name]
    assert summary["steps"] == 4 and summary["task"] == "seq-cls" and summary["labels"] == ["0", "1"]
    # lora: 2 layers x (query + value) x r=4 x (16 + 16); head: 16 x 2 + 2
    assert summary["trainable_params"] == 2 * 2 * 4 * 32 + 34
    assert summary["data"]["records_read"] == 4


def test_training_moves_the_head_copy_and_lora_but_not_the_base(seq_run, bert_dir):
    _, result = seq_run
    model = result.lora.model
    wrapper = result.lora.saved_modules["classifier"]
    assert max_abs_diff(wrapper.modules_to_save.weight, wrapper.original_module.weight) > 1e-3
    fresh = AutoModelForSequenceClassification.from_pretrained(bert_dir, num_labels=2)
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.base_layer.weight,
                       fresh.bert.encoder.layer[0].attention.self.query.weight)
    assert result.summary["losses"][-1] < result.summary["losses"][0]


def _ids(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tok(texts, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("run, auto", [("seq_run", AutoModelForSequenceClassification),
                                       ("token_run", AutoModelForTokenClassification)])
def test_peft_reloads_the_head_adapter_with_the_same_logits(run, auto, request, bert_dir):
    out, result = request.getfixturevalue(run)
    spec = HeadSpec.load(out)
    session = InferenceSession.open(None, {"head": out})  # the base from the adapter's base_model_name_or_path
    session.route(["head"])
    tok = session.tokenizer
    base = auto.from_pretrained(bert_dir, num_labels=len(spec.labels)).eval()
    batch = _ids(tok, ["that loves its characters", "EU rejects German call to boycott British lamb ."])
    with torch.no_grad():
        untrained = base(**batch).logits
    theirs = peft.PeftModel.from_pretrained(base, out).eval()  # injects into base in place
    with torch.no_grad():
        ours = session.model(**batch).logits
        trained = result.lora.model.eval()(**batch).logits
        peft_logits = theirs(**batch).logits
    assert max_abs_diff(ours, peft_logits) <= FP32
    assert max_abs_diff(ours, trained) <= FP32  # what was saved is what was trained
    assert max_abs_diff(ours, untrained) > 1e-3  # and it is not the untrained head


def test_token_cls_run_learns_bio_labels(token_run):
    out, result = token_run
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "TOKEN_CLS"
    assert result.summary["labels"][:3] == ["O", "B-LOC", "I-LOC"]
    assert result.summary["data"]["records_read"] == 4


def test_validation_reports_loss_and_metric(bert_dir, tmp_path):
    result = train_head(_cfg(bert_dir, tmp_path, val_data=str(SST2), eval_every=2), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"val_accuracy", "val_macro_f1"} <= set(evals[0])
    assert set(result.summary["best_val_scores"]) == {"accuracy", "macro_f1", "invalid"}
    assert (tmp_path / "checkpoints" / "best" / "adapter_model.safetensors").is_file()


def test_token_cls_validation_scores_entities(bert_dir, tmp_path):
    result = train_head(_cfg(bert_dir, tmp_path, "token-cls", val_split=0.5), progress=False)
    assert set(result.summary["best_val_scores"]) == {"precision", "recall", "f1"}


def test_resume_equals_a_straight_run(bert_dir, tmp_path):
    straight = train_head(_cfg(bert_dir, tmp_path / "straight", lora_dropout=0.1), progress=False).summary
    cut = tmp_path / "cut"
    train_head(_cfg(bert_dir, cut, lora_dropout=0.1, save_every=2), progress=False)
    import shutil
    shutil.rmtree(cut / "checkpoints" / "step-4")
    resumed = train_head(loop.resume_config(cut, {}), resume=True, progress=False).summary
    assert resumed["losses"] == straight["losses"]


def test_few_shot_is_stratified(bert_dir, tmp_path):
    # 3 rows of label 0 and 1 of label 1: two examples are one of each
    result = train_head(_cfg(bert_dir, tmp_path, max_examples=2, max_steps=1), progress=False)
    assert result.summary["data"]["records_read"] == 2
    assert json.loads((tmp_path / "labels.json").read_text())["num_labels"] == 2


def test_given_labels_reject_others_with_file_and_line(bert_dir, tmp_path):
    with pytest.raises(LoraforgeError, match=r"sst2_train_head.tsv:2: .*allowed labels: 1, 2"):
        train_head(_cfg(bert_dir, tmp_path, labels="1,2"), progress=False)


def test_run_head_scores_what_it_predicts(token_run):
    out, _ = token_run
    session = InferenceSession.open(None, {"head": out})
    tok, spec = session.tokenizer, session.head
    examples = [spec.encode(r, tok, max_length=4) for r in read_records(CONLL, "conll")]
    with session.use("head") as model:
        out = run_head(model, examples, spec, pad_id=0)
    assert [len(p) for p in out.predictions] == [len(e.reference) for e in examples]  # cut-off words are "O"
    assert out.count == sum(sum(s >= 0 for s in e.word_starts) for e in examples) and out.loss_sum > 0
    # each chosen tag's probability: the largest of the word's softmax (at least 1/K), 1.0 for a cut-off word
    assert [len(p) for p in out.probabilities] == [len(p) for p in out.predictions]
    for probs, e in zip(out.probabilities, examples):
        assert all(1 / len(spec.labels) <= p <= 1 for p in probs)
        assert all(p == 1.0 for p, s in zip(probs, e.word_starts) if s < 0)


# ---- mistakes ----------------------------------------------------------------------------------------------------
def test_seq_cls_on_a_decoder_is_refused(tmp_path):
    llama = save_tiny_llama(tmp_path / "llama")
    with pytest.raises(LoraforgeError, match="is a decoder"):
        train_head(TrainConfig(model=str(llama), task="seq-cls", data=str(SST2), output=str(tmp_path / "o"),
                               columns={"text": "sentence"}), progress=False)


@pytest.mark.parametrize("flags, words", [
    (["--model", "LLAMA", "--columns", "text=sentence"], "is a decoder"),
    (["--model", "BERT", "--columns", "text=review"], 'field "review" (as "text") is missing'),
    (["--model", "BERT", "--columns", "text=sentence", "--recipe", "e2e"], "cannot feed a seq-cls head"),
    (["--model", "BERT", "--columns", "text=sentence", "--labels", "only"], "two or more distinct"),
    (["--model", "BERT", "--columns", "text=sentence", "--data-format", "text"], "is for causal-lm"),
])
def test_cli_head_mistakes_exit_2(flags, words, bert_dir, tmp_path, capsys):
    llama = save_tiny_llama(tmp_path / "llama")
    flags = [{"LLAMA": str(llama), "BERT": str(bert_dir)}.get(f, f) for f in flags]
    code = main(["train", "--task", "seq-cls", "--data", str(SST2), "--output", str(tmp_path / "out"),
                 "--max-steps", "1", *flags])
    assert code == 2
    assert words in capsys.readouterr().err


# ---- the real encoder --------------------------------------------------------------------------------------------
SHARED_SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"  # ../shared beside the repo


@pytest.mark.integration
def test_minilm_sst2_few_shot_head_reloads_in_peft(tmp_path):
    from loraforge.infer.predict import predict_file
    from loraforge.models import resolve_model

    out = tmp_path / "run"
    result = train_head(TrainConfig(model="minilm-l6", task="seq-cls", data=str(SHARED_SST2 / "train.tsv"),
                                    columns={"text": "sentence"}, max_examples=32, max_steps=4, batch_size=8,
                                    lr=1e-3, output=str(out)), progress=False)
    assert result.summary["data"]["records_read"] == 32 and result.summary["steps"] == 4
    scored = predict_file(SHARED_SST2 / "dev.tsv", adapter=out, max_examples=32)
    assert scored.scored == 32 and 0.0 <= scored.scores["accuracy"] <= 1.0 and scored.scores["invalid"] == 0
    session = InferenceSession.open(None, {"head": out})
    session.route(["head"])
    tok = session.tokenizer
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm-l6"), num_labels=2)
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    batch = _ids(tok, [r.fields["sentence"] for r in read_records(SHARED_SST2 / "dev.tsv")][:8])
    with torch.no_grad():
        assert max_abs_diff(session.model(**batch).logits, theirs(**batch).logits) <= FP32


def test_label_smoothing_reaches_the_head_loss_and_the_logged_loss(bert_dir, tmp_path, monkeypatch):
    """Step 1's logged loss is F.cross_entropy(label_smoothing=0.1) of the logits the loop computed, per label."""
    from types import SimpleNamespace

    from loraforge.train import heads

    seen = []
    real = torch.nn.functional

    def spy(logits, labels, **kw):
        seen.append((logits.detach().clone(), labels.clone(), kw))
        return real.cross_entropy(logits, labels, **kw)

    monkeypatch.setattr(heads, "F", SimpleNamespace(cross_entropy=spy))
    summary = train_head(_cfg(bert_dir, tmp_path, max_steps=1, label_smoothing=0.1), progress=False).summary
    logits, labels, kw = seen[0]
    assert kw["label_smoothing"] == 0.1
    n = int((labels != IGNORE_INDEX).sum())
    smoothed = real.cross_entropy(logits, labels, label_smoothing=0.1).item()
    plain = real.cross_entropy(logits, labels).item()
    assert abs(summary["losses"][0] - smoothed) <= 1e-6 and n == 2
    assert abs(smoothed - plain) > 1e-3  # the check above tells the two apart
