"""Training: the chunked loss equals transformers' own, a golden loss list, and what a run writes to disk."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fixtures.tiny_models import HEAD_DIM, HEADS, HIDDEN, KV_HEADS, LAYERS, tiny_tokenizer, write_jsonl
from helpers import tiny_gpt2, tiny_llama  # initializer_range 0.3: O(1) logits make 1e-6 a real check
from loraforge.config import TrainConfig, build_config, load_yaml
from loraforge.data import IGNORE_INDEX, collate, load_examples
from loraforge.errors import LoraforgeError
from loraforge.lora import LoraConfig, LoraModel, load_adapter
from loraforge.models import load_model
from loraforge.train import causal_lm_loss, loop, train
from loraforge.train import loss as loss_module
from loraforge.train.loss import token_loss_sum
from tolerances import FP32, max_abs_diff

GOLDEN = Path(__file__).parent / "golden" / "tiny_llama_losses.json"
GOLDEN_OPTIONS = dict(max_steps=5, batch_size=2, lr=1e-2, seed=0, r=4, lora_alpha=8, lora_dropout=0.0, packing=False,
                      dtype="float32")
RECORD_TOKENS = 9 + 13 + 8 + 30 + 14  # the 5 RECORDS with the BOS-adding tokenizer, EOS included (by hand)


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(llama_dir: Path, data_file: Path, output: Path, **overrides) -> TrainConfig:
    options = {**GOLDEN_OPTIONS, **overrides}
    return TrainConfig(model=str(llama_dir), data=str(data_file), output=str(output), **options)


@pytest.fixture(scope="module")
def golden_run(llama_dir, data_file, tmp_path_factory):
    """The golden configuration, trained once; every batch the loop feeds the loss is recorded."""
    batches: list[dict[str, torch.Tensor]] = []

    def spy(model, batch, label_smoothing):
        batches.append({k: v.clone() for k, v in batch.items()})
        return token_loss_sum(model, batch, label_smoothing)

    cfg = _train(llama_dir, data_file, tmp_path_factory.mktemp("golden_out"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loss_module, "token_loss_sum", spy)  # what the loop's loss module calls
        result = train(cfg, progress=False)
    return cfg, result, batches


# ---- the loss ---------------------------------------------------------------------------------------------------
def _padded_batch(tmp_path: Path) -> dict[str, torch.Tensor]:
    """All 5 records in one batch: right padding, and -100 on the instruction prompts."""
    examples, _ = load_examples(write_jsonl(tmp_path / "d.jsonl"), tiny_tokenizer(), max_length=64)
    return collate(examples, pad_id=0)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("chunk_rows", [1024, 3], ids=["one_chunk", "chunks_of_3"])
def test_causal_lm_loss_equals_transformers_loss_and_gradients(builder, chunk_rows, tmp_path, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", chunk_rows)
    batch = _padded_batch(tmp_path)
    learned = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert learned == RECORD_TOKENS - 31 == 43  # more than one chunk of 3
    assert (batch["attention_mask"] == 0).any()  # padding
    assert ((batch["labels"] == IGNORE_INDEX) & (batch["attention_mask"] == 1)).sum() == 3 + 18 + 10  # BOS, prompts

    torch.manual_seed(0)
    lm = LoraModel(builder(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))  # B != 0: both A and B get grads
    params = lm.adapter_parameters()

    ours = causal_lm_loss(lm.model, batch)
    ours.backward()
    our_grads = {k: p.grad.clone() for k, p in params.items()}
    lm.model.zero_grad(set_to_none=True)
    theirs = lm.model(**batch).loss
    theirs.backward()

    assert theirs.item() > 1.0  # a real loss, not a degenerate zero
    assert abs(ours.item() - theirs.item()) <= 1e-6
    assert len(params) == 2 * LAYERS * (2 if builder is tiny_llama else 1)
    for key, p in params.items():
        assert p.grad.abs().max() > 1e-4, key
        assert max_abs_diff(our_grads[key], p.grad) <= 1e-6, key


@pytest.mark.parametrize("chunk_rows", [1024, 3], ids=["one_chunk", "chunks_of_3"])
def test_loss_with_a_trainable_head_equals_transformers(chunk_rows, tmp_path, monkeypatch):
    """lm_head in modules_to_save takes the autograd path (checkpointed chunks), not the fused frozen-head one."""
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", chunk_rows)
    batch = _padded_batch(tmp_path)
    torch.manual_seed(0)
    lm = LoraModel(tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, modules_to_save=["lm_head"]))
    params = lm.adapter_parameters()
    assert "lm_head.weight" in params and not loss_module._frozen_linear(lm.model.get_output_embeddings())
    ours = causal_lm_loss(lm.model, batch)
    ours.backward()
    our_grads = {k: p.grad.clone() for k, p in params.items()}
    lm.model.zero_grad(set_to_none=True)
    theirs = lm.model(**batch).loss
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-6
    for key, p in params.items():
        assert p.grad.abs().max() > 1e-4, key
        assert max_abs_diff(our_grads[key], p.grad) <= 1e-6, key


@pytest.mark.parametrize("path", ["frozen_head", "trainable_head", "whole_model"])
@pytest.mark.parametrize("chunk_rows", [1024, 3], ids=["one_chunk", "chunks_of_3"])
def test_label_smoothed_loss_equals_torch_cross_entropy(path, chunk_rows, tmp_path, monkeypatch):
    """Each of the three loss paths, with label smoothing 0.1, against F.cross_entropy(label_smoothing=0.1) on the
    full logits: loss and gradients. The fused head's gradient is softmax - ((1 - e) onehot + e / V)."""
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", chunk_rows)
    if path == "whole_model":
        monkeypatch.setattr(loss_module, "has_plain_head", lambda model: False)
    batch = _padded_batch(tmp_path)
    torch.manual_seed(0)
    extra = {"modules_to_save": ["lm_head"]} if path == "trainable_head" else {}
    lm = LoraModel(tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **extra))
    params = lm.adapter_parameters()
    total, count = token_loss_sum(lm.model, batch, label_smoothing=0.1)
    total.backward()
    our_grads = {k: p.grad.clone() for k, p in params.items()}
    lm.model.zero_grad(set_to_none=True)
    logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    theirs = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                               reduction="sum", label_smoothing=0.1)
    theirs.backward()
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                              reduction="sum")
    assert count == 43
    assert abs(theirs.item() - plain.item()) > 0.5  # 218.8 vs 219.7: the 2e-2 check below can tell them apart
    assert abs(total.item() - theirs.item()) <= 1e-4 * theirs.item()
    for key, p in params.items():
        assert p.grad.abs().max() > 1e-4, key
        assert max_abs_diff(our_grads[key], p.grad) <= 1e-5, key


def test_label_smoothing_must_be_below_one(tmp_path):
    with pytest.raises(LoraforgeError, match="label_smoothing"):
        TrainConfig(data=str(tmp_path / "d.jsonl"), label_smoothing=1.0)


# ---- golden numbers and seeds -----------------------------------------------------------------------------------
def test_golden_loss_list(golden_run):
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert golden["options"] == GOLDEN_OPTIONS  # the script and this test run the same thing
    assert golden["command"] == "python tests/golden/make_golden.py"
    losses = golden_run[1].summary["losses"]
    assert len(losses) == 5
    assert losses == pytest.approx(golden["losses"], rel=1e-5)


def test_golden_packed_loss_list(llama_dir, data_file, tmp_path):
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert golden["packed_options"] == {**GOLDEN_OPTIONS, "packing": True, "max_length": 32}
    losses = train(_train(llama_dir, data_file, tmp_path, packing=True, max_length=32), progress=False).summary
    assert losses["losses"] == pytest.approx(golden["packed_losses"], rel=1e-5)
    assert losses["losses"] != pytest.approx(golden["losses"], rel=1e-3)  # packing really changed the batches


def test_golden_nf4_loss_list(llama_dir, data_file, tmp_path):
    """QLoRA on the tiny model: the base's linears packed as NF4, LoRA on all of them."""
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    options = {**GOLDEN_OPTIONS, "quantize": "nf4", "target_modules": "all-linear"}
    assert golden["nf4_options"] == options
    losses = train(_train(llama_dir, data_file, tmp_path, **options), progress=False).summary["losses"]
    assert losses == pytest.approx(golden["nf4_losses"], rel=1e-5)
    dense = train(_train(llama_dir, data_file, tmp_path / "dense", target_modules="all-linear"), progress=False)
    assert 1e-4 < abs(losses[0] - dense.summary["losses"][0]) < 0.05  # the quantization error, small but real


def test_same_seed_same_losses_other_seed_other_losses(golden_run, llama_dir, data_file, tmp_path):
    again = train(_train(llama_dir, data_file, tmp_path / "again"), progress=False).summary["losses"]
    other = train(_train(llama_dir, data_file, tmp_path / "other", seed=1), progress=False).summary["losses"]
    assert again == golden_run[1].summary["losses"]  # bit for bit
    assert max(abs(a - b) for a, b in zip(other, again)) > 1e-3


# ---- what a run writes ------------------------------------------------------------------------------------------
def test_train_summary_file(golden_run):
    cfg, result, batches = golden_run
    summary = json.loads((Path(cfg.output) / loop.SUMMARY_FILE).read_text(encoding="utf-8"))
    assert summary == result.summary
    assert summary["steps"] == 5
    assert len(batches) == 5
    # 5 steps x 2 examples = the 5 records twice, in whatever order: every one of their tokens, twice.
    assert summary["train_tokens"] == sum(int(b["attention_mask"].sum()) for b in batches) == 2 * RECORD_TOKENS == 148
    assert summary["train_seconds"] > 0
    # tokens / seconds, both rounded: seconds to 1 ms, tokens_per_second to 0.01.
    tokens, seconds = summary["train_tokens"], summary["train_seconds"]
    assert tokens / (seconds + 5e-4) - 5e-3 <= summary["tokens_per_second"] <= tokens / (seconds - 5e-4) + 5e-3
    assert summary["final_loss"] == summary["losses"][-1]
    assert summary["peak_rss_mb"] > 0
    # Llama's default targets q_proj (32 -> 4 heads x 8) and v_proj (32 -> 2 kv heads x 8); a pair is r x (in + out).
    r = cfg.r
    per_layer = r * (HIDDEN + HEADS * HEAD_DIM) + r * (HIDDEN + KV_HEADS * HEAD_DIM)
    assert summary["trainable_params"] == LAYERS * per_layer == 896


def test_train_config_yaml_round_trips(golden_run):
    cfg = golden_run[0]
    path = Path(cfg.output) / loop.CONFIG_FILE
    assert TrainConfig(**yaml.safe_load(path.read_text(encoding="utf-8"))) == cfg
    assert build_config(TrainConfig, load_yaml(path), source=str(path)) == cfg  # as `loraforge train FILE` reads it


def test_saved_adapter_gives_the_trained_models_logits(golden_run, llama_dir):
    cfg, result, _ = golden_run
    out = Path(cfg.output)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[1, 4, 14, 15, 7, 12, 4, 25], [1, 35, 36, 39, 32, 5, 24, 2]])  # (2, 8)
    with torch.no_grad():
        trained = result.lora.model(input_ids=ids).logits
        base, _ = load_model(str(llama_dir))
        base_logits = base(input_ids=ids).logits
        loaded = load_adapter(base, out).model(input_ids=ids).logits
    assert max_abs_diff(trained, base_logits) > 1e-4  # training changed something
    assert max_abs_diff(loaded, trained) <= FP32
