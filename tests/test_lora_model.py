"""LoraModel on tiny llama, gpt2 and bert: merge/unmerge/unload, disable, training touches only the adapter,
bias and modules_to_save modes, per-module patterns, the parameter report, errors and adapter files."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import BUILDERS, HIDDEN, LAYERS, logits, tiny_bert_cls, tiny_gpt2, tiny_llama, token_ids
from loraforge.errors import LoraforgeError
from loraforge.lora import LoraConfig, LoraEmbedding, LoraLinear, LoraModel, load_adapter, save_adapter
from tolerances import FP32, max_abs_diff

# Per architecture: targets covering every layer kind it has (Linear, Conv1D, Embedding, a saved head).
TARGETS = {
    "llama": dict(target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "gpt2": dict(target_modules=["c_attn", "c_proj"]),
    "bert": dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
}
ARCHS = list(TARGETS)


def _lora(arch: str, seed: int = 0, **overrides) -> LoraModel:
    torch.manual_seed(seed)
    options = dict(r=4, lora_alpha=8, init_lora_weights=False, **TARGETS[arch]) | overrides
    lm = LoraModel(BUILDERS[arch](), LoraConfig(**options))
    for wrapper in lm.saved_modules.values():  # a head copy equal to the original would hide a mix-up
        with torch.no_grad():
            for p in wrapper.modules_to_save.parameters():
                p.add_(0.5)
    return lm


def _base_weights(lm: LoraModel) -> dict[str, torch.Tensor]:
    return {path: layer.base_layer.weight.detach().clone() for path, layer in lm.layers.items()}


# ---- merge / unmerge / unload -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_equals_unmerged_equals_unloaded(arch, use_dora):
    lm = _lora(arch, use_dora=use_dora)
    base = logits(BUILDERS[arch]())
    unmerged = logits(lm.model)
    assert max_abs_diff(unmerged, base) > 1e-2  # the adapter does something
    lm.merge()
    assert lm.merged
    merged = logits(lm.model)
    assert max_abs_diff(merged, unmerged) <= FP32
    plain = lm.merge_and_unload()
    assert not any(isinstance(m, (LoraLinear, LoraEmbedding)) for m in plain.modules())
    assert not any(p.requires_grad for p in plain.parameters())
    assert max_abs_diff(logits(plain), unmerged) <= FP32


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_twice_equals_merge_once_and_unmerge_is_exact(arch):
    lm = _lora(arch)
    before = _base_weights(lm)
    unmerged = logits(lm.model)
    lm.merge()
    once = _base_weights(lm)
    assert all(not torch.equal(once[p], before[p]) for p in before)
    lm.merge()
    twice = _base_weights(lm)
    assert all(torch.equal(once[p], twice[p]) for p in before)
    lm.unmerge()
    assert not lm.merged
    assert all(torch.equal(lm.layers[p].base_layer.weight, before[p]) for p in before)
    lm.unmerge()  # idempotent
    assert all(torch.equal(lm.layers[p].base_layer.weight, before[p]) for p in before)
    assert torch.equal(logits(lm.model), unmerged)


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapter_gives_base_logits_exactly(arch):
    base = logits(BUILDERS[arch]())
    lm = _lora(arch)
    adapted = logits(lm.model)
    with lm.disable_adapter():
        assert torch.equal(logits(lm.model), base)
    assert torch.equal(logits(lm.model), adapted)
    lm.merge()
    merged = logits(lm.model)
    with lm.disable_adapter():
        assert not lm.merged
        assert torch.equal(logits(lm.model), base)
    assert lm.merged
    assert torch.equal(logits(lm.model), merged)


# ---- training touches only the adapter ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("use_dora", [False, True])
def test_optimizer_step_changes_only_adapter(arch, use_dora):
    lm = _lora(arch, use_dora=use_dora)
    adapter = lm.adapter_parameters()
    adapter_ids = {id(p) for p in adapter.values()}
    named = dict(lm.model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    assert {n for n, p in named.items() if p.requires_grad} == {n for n, p in named.items() if id(p) in adapter_ids}
    lm.model.train()
    optimizer = torch.optim.AdamW([p for p in lm.model.parameters() if p.requires_grad], lr=1e-2)
    out = lm.model(input_ids=token_ids())
    loss = out.logits.float().pow(2).mean()
    loss.backward()
    for n, p in named.items():
        if id(p) in adapter_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    optimizer.step()
    for n, p in named.items():
        assert torch.equal(p, before[n]) != (id(p) in adapter_ids), n


def test_trainable_names_llama():
    lm = _lora("llama", target_modules=["q_proj", "v_proj"])
    trainable = sorted(n for n, p in lm.model.named_parameters() if p.requires_grad)
    expected = sorted(f"model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
                      for i in range(LAYERS) for m in ("q_proj", "v_proj") for ab in "AB")
    assert trainable == expected
    assert sorted(lm.adapter_parameters()) == expected


def test_bias_all_gpt2():
    lm = _lora("gpt2", bias="all")
    trainable = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    biases = {n for n, _ in lm.model.named_parameters() if n.endswith(".bias")}
    lora = {n for n, _ in lm.model.named_parameters() if ".lora_" in n}
    assert len(biases) == 2 * (4 + 2) + 1  # per block: c_attn, 2 c_proj, c_fc, ln_1, ln_2; plus ln_f
    assert trainable == biases | lora
    assert "transformer.h.0.attn.c_attn.base_layer.bias" in lm.adapter_parameters()
    assert "transformer.ln_f.bias" in lm.adapter_parameters()


def test_bias_lora_only_gpt2():
    lm = _lora("gpt2", bias="lora_only")
    trainable = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    lora = {n for n, _ in lm.model.named_parameters() if ".lora_" in n}
    wrapped_biases = {f"transformer.h.{i}.{m}.base_layer.bias"
                      for i in range(LAYERS) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}
    assert trainable == lora | wrapped_biases
    assert len(wrapped_biases) == 6
    # adapter-file keys are peft's: the bias sits on the wrapped layer's base_layer
    assert {k for k in lm.adapter_parameters() if k.endswith(".bias")} == wrapped_biases


def test_bias_all_with_modules_to_save_bert():
    # the frozen original head is never trained; the copy's bias is trained as part of the copy
    lm = _lora("bert", bias="all")
    trainable = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    assert "classifier.original_module.bias" not in trainable
    assert {"classifier.modules_to_save.bias", "classifier.modules_to_save.weight"} <= trainable
    assert "bert.embeddings.LayerNorm.bias" in trainable


def test_modules_to_save_trains_a_copy_of_the_head():
    lm = _lora("bert")
    wrapper = lm.saved_modules["classifier"]
    original = wrapper.original_module.weight.detach().clone()
    assert not wrapper.original_module.weight.requires_grad
    assert wrapper.modules_to_save.weight.requires_grad
    assert wrapper.modules_to_save.weight is not wrapper.original_module.weight
    assert set(lm.adapter_parameters()) >= {"classifier.weight", "classifier.bias"}
    copy_before = wrapper.modules_to_save.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in lm.model.parameters() if p.requires_grad], lr=1e-2)
    lm.model(input_ids=token_ids()).logits.pow(2).mean().backward()
    optimizer.step()
    assert torch.equal(wrapper.original_module.weight, original)
    assert not torch.equal(wrapper.modules_to_save.weight, copy_before)
    # the head's output is the copy's: pooled (2, 16) @ copy^T + bias
    pooled = lm.model.bert(input_ids=token_ids()).pooler_output
    expected = pooled @ wrapper.modules_to_save.weight.T + wrapper.modules_to_save.bias
    assert max_abs_diff(logits(lm.model), expected) <= FP32
    plain = lm.merge_and_unload()
    assert torch.equal(plain.classifier.weight, wrapper.modules_to_save.weight)


def test_rank_and_alpha_pattern():
    lm = _lora("llama", target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
               rank_pattern={"model.layers.0.self_attn.q_proj": 2, "v_proj": 6},
               alpha_pattern={"layers.1.self_attn.q_proj": 3})
    shapes = {p: (layer.r, layer.lora_alpha, layer.scaling, tuple(layer.lora_A.weight.shape))
              for p, layer in lm.layers.items()}
    assert shapes == {
        "model.layers.0.self_attn.q_proj": (2, 8, 4.0, (2, HIDDEN)),
        "model.layers.0.self_attn.v_proj": (6, 8, 8 / 6, (6, HIDDEN)),
        "model.layers.1.self_attn.q_proj": (4, 3, 0.75, (4, HIDDEN)),
        "model.layers.1.self_attn.v_proj": (6, 8, 8 / 6, (6, HIDDEN)),
    }


def test_exclude_modules():
    lm = _lora("llama", target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"])
    assert sorted(lm.layers) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                                 "model.layers.1.self_attn.v_proj"]
    lm = _lora("llama", target_modules=["q_proj", "v_proj"], exclude_modules=r"model\.layers\.1\..*")
    assert sorted(lm.layers) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_report_counts_llama():
    total_base = sum(p.numel() for p in tiny_llama().parameters())
    lm = LoraModel(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    # q_proj and v_proj are both 16 -> 16 here: r·(in + out) = 4·(16 + 16) = 128 each, 2 per layer, 2 layers
    assert 4 * (16 + 16) * 2 * 2 == 512
    report = lm.report()
    assert report.trainable == 512
    assert report.total == total_base + 512
    assert report.adapter_bytes == 512 * 4
    assert f"({100 * 512 / (total_base + 512):.4f}%)" in str(report)
    assert "trainable params: 512 / " in str(report)


def test_report_counts_bert_with_head_and_embedding_gpt2():
    lm = LoraModel(tiny_bert_cls(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    # query 16 -> 16 at r=2: 2·32 = 64 per layer, 2 layers; the head copy: 3·16 + 3 = 51
    assert lm.report().trainable == 64 * 2 + 51
    lm = LoraModel(tiny_gpt2(), LoraConfig(r=2, target_modules=["wte", "c_attn"]))
    # wte 64 x 16: A (2, 64) + B (16, 2) = 160; c_attn 16 -> 48: 2·(16 + 48) = 128 per layer, 2 layers
    assert lm.report().trainable == 160 + 128 * 2


# ---- errors -------------------------------------------------------------------------------------------------------
def test_llama_targets_on_gpt2_list_what_exists():
    with pytest.raises(LoraforgeError) as err:
        LoraModel(tiny_gpt2(), LoraConfig(target_modules=["q_proj", "v_proj"]))
    message = str(err.value)
    assert "matches no layer" in message
    assert "c_attn (Conv1D" in message
    assert "--target-modules c_attn" in message


def test_unwrappable_target():
    with pytest.raises(LoraforgeError) as err:
        LoraModel(tiny_llama(), LoraConfig(target_modules=["mlp"]))
    message = str(err.value)
    assert "model.layers.0.mlp (LlamaMLP)" in message
    assert "cannot wrap" in message


def test_nan_merge_raises_and_changes_nothing():
    lm = _lora("llama", target_modules=["q_proj", "v_proj"])
    before = _base_weights(lm)
    last = list(lm.layers)[-1]
    with torch.no_grad():
        lm.layers[last].lora_B.weight[0, 0] = float("nan")
    with pytest.raises(LoraforgeError) as err:
        lm.merge()
    assert last in str(err.value) and "NaN" in str(err.value)
    assert not lm.merged
    assert all(torch.equal(lm.layers[p].base_layer.weight, before[p]) for p in before)
    with pytest.raises(LoraforgeError):
        lm.merge_and_unload()
    assert all(torch.equal(lm.layers[p].base_layer.weight, before[p]) for p in before)


def test_new_lora_layers_follow_the_model_train_eval_mode():
    lm = LoraModel(tiny_llama().eval(), LoraConfig(r=2, lora_dropout=0.5, target_modules=["q_proj"],
                                                  modules_to_save=["lm_head"]))
    assert not any(m.training for m in lm.model.modules())  # dropout off after loading an adapter for inference
    ids = token_ids()
    assert torch.equal(logits(lm.model, ids), logits(lm.model, ids))


def test_merge_refuses_tied_embedding_and_changes_nothing():
    lm = _lora("gpt2", target_modules=["wte", "c_attn"])  # GPT-2 ties lm_head to wte
    assert lm.model.lm_head.weight is lm.layers["transformer.wte"].base_layer.weight
    before = _base_weights(lm)
    with pytest.raises(LoraforgeError) as err:
        lm.merge()
    assert "transformer.wte" in str(err.value) and "tied to lm_head" in str(err.value)
    assert not lm.merged
    assert all(torch.equal(lm.layers[p].base_layer.weight, before[p]) for p in before)


@pytest.mark.parametrize("options, words", [
    (dict(r=0), ["'r'", "positive", "0"]),
    (dict(r=2.5), ["'r'", "2.5"]),
    (dict(bias="x"), ["'bias'", "'x'", "lora_only"]),
    (dict(lora_dropout=1.0), ["lora_dropout"]),
    (dict(lora_alpha=0), ["lora_alpha"]),
    (dict(init_lora_weights="olora"), ["init_lora_weights", "olora"]),
    (dict(rank_pattern={"q_proj": 0}), ["rank_pattern", "q_proj"]),
    (dict(target_modules="(["), ["target_modules", "regex"]),
    (dict(rank=8), ["unknown", "rank", "lora_alpha"]),
])
def test_bad_config_values(options, words):
    with pytest.raises(LoraforgeError) as err:
        LoraConfig.from_dict(options, source="train.yaml")
    assert all(w in str(err.value) for w in words), str(err.value)


# ---- adapter files ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip(arch, tmp_path):
    lm = _lora(arch, use_dora=arch == "llama", bias="lora_only")
    expected = logits(lm.model)
    save_adapter(lm, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = load_adapter(BUILDERS[arch](), tmp_path)
    assert torch.equal(logits(loaded.model), expected)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    trainable = load_adapter(BUILDERS[arch](), tmp_path, trainable=True)
    assert {n for n, p in trainable.model.named_parameters() if p.requires_grad} == \
        {n for n, p in lm.model.named_parameters() if p.requires_grad}


def _saved_llama(tmp_path, **overrides):
    lm = _lora("llama", target_modules=["q_proj", "v_proj"], **overrides)
    save_adapter(lm, tmp_path)
    return tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"


def test_load_missing_key(tmp_path):
    weights, _ = _saved_llama(tmp_path)
    state = load_file(weights)
    del state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(state, weights)
    with pytest.raises(LoraforgeError) as err:
        load_adapter(tiny_llama(), tmp_path)
    assert "missing key base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in str(err.value)
    assert "(16, 4)" in str(err.value)


def test_load_extra_key(tmp_path):
    weights, _ = _saved_llama(tmp_path)
    state = load_file(weights)
    state["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 16)
    save_file(state, weights)
    with pytest.raises(LoraforgeError) as err:
        load_adapter(tiny_llama(), tmp_path)
    assert "unexpected key base_model.model.model.layers.0.mlp.up_proj.lora_A.weight" in str(err.value)


def test_load_rank_mismatch(tmp_path):
    _, config = _saved_llama(tmp_path)
    data = json.loads(config.read_text())
    assert data["r"] == 4
    data["r"] = 8
    config.write_text(json.dumps(data))
    with pytest.raises(LoraforgeError) as err:
        load_adapter(tiny_llama(), tmp_path)
    message = str(err.value)
    assert "lora_A.weight has shape (4, 16) in the file but (8, 16) in the model" in message


def test_llama_adapter_on_gpt2(tmp_path):
    _saved_llama(tmp_path)
    with pytest.raises(LoraforgeError) as err:
        load_adapter(tiny_gpt2(), tmp_path)
    message = str(err.value)
    assert "does not fit this model" in message
    assert "c_attn (Conv1D" in message


class _Trap:
    """Unpickling this runs os.mkdir: proof that a file was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_bin_adapter_refused_without_unpickling(tmp_path):
    _saved_llama(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(LoraforgeError) as err:
        load_adapter(tiny_llama(), tmp_path)
    message = str(err.value)
    assert "adapter_model.bin" in message and "safetensors" in message and "never unpickles" in message
    assert not marker.exists()


@pytest.mark.parametrize("field, value, words", [
    ("use_qalora", True, ["use_qalora", "does not support"]),
    ("peft_type", "IA3", ["peft_type", "IA3", "LoRA adapters only"]),
    ("layers_to_transform", [0], ["layers_to_transform"]),
    ("some_future_field", 3, ["unknown field", "some_future_field"]),
])
def test_unsupported_adapter_config_refused(tmp_path, field, value, words):
    _, config = _saved_llama(tmp_path)
    data = json.loads(config.read_text())
    data[field] = value
    config.write_text(json.dumps(data))
    with pytest.raises(LoraforgeError) as err:
        load_adapter(tiny_llama(), tmp_path)
    assert all(w in str(err.value) for w in words), str(err.value)
