"""Adapters move between loraforge and the real `peft` package, both ways, with the same logits.

`peft` is the oracle here and a test dependency only. Both sides use init_lora_weights=False (and perturb saved
heads and trained biases) so every adapter tensor matters to the logits.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import BUILDERS, logits
from loraforge.lora import LoraConfig, LoraModel, load_adapter, save_adapter
from tolerances import FP32, max_abs_diff


@dataclass
class Case:
    arch: str
    options: dict
    peft_only: dict = field(default_factory=dict)  # options only peft needs


CASES = {
    "linear": Case("llama", dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "conv1d": Case("gpt2", dict(target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM"),
                   peft_only=dict(fan_in_fan_out=True)),
    "embedding": Case("llama", dict(target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")),
    "dora": Case("llama", dict(target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True,
                               task_type="CAUSAL_LM")),
    "dora_conv1d": Case("gpt2", dict(target_modules=["c_attn"], use_dora=True, task_type="CAUSAL_LM"),
                        peft_only=dict(fan_in_fan_out=True)),
    "rslora": Case("llama", dict(target_modules=["q_proj", "v_proj", "o_proj"], use_rslora=True, r=8,
                                 task_type="CAUSAL_LM")),
    "patterns": Case("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
                                   rank_pattern={"model.layers.0.self_attn.q_proj": 2, "down_proj": 6},
                                   alpha_pattern={"v_proj": 3, "layers.1.self_attn.q_proj": 12})),
    "seq_cls": Case("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"],
                                 task_type="SEQ_CLS")),
    "bias_lora_only": Case("gpt2", dict(target_modules=["c_attn", "c_fc"], bias="lora_only", task_type="CAUSAL_LM"),
                           peft_only=dict(fan_in_fan_out=True)),
}


def _options(case: Case) -> dict:
    return dict(r=4, lora_alpha=8, init_lora_weights=False) | case.options


@torch.no_grad()
def _perturb_trained_extras(model: nn.Module) -> None:
    """Shift the saved head copies and trainable biases, so a head or bias that fails to load shows in the logits."""
    for name, p in model.named_parameters():
        if p.requires_grad and ("modules_to_save" in name or name.endswith(".bias")):
            p.add_(0.25)


def _loraforge_adapter(case: Case, directory: Path) -> torch.Tensor:
    torch.manual_seed(1)
    lm = LoraModel(BUILDERS[case.arch](), LoraConfig(**_options(case)))
    _perturb_trained_extras(lm.model)
    save_adapter(lm, directory)
    return logits(lm.model)


def _peft_adapter(case: Case, directory: Path) -> torch.Tensor:
    torch.manual_seed(1)
    model = peft.get_peft_model(BUILDERS[case.arch](), peft.LoraConfig(**_options(case), **case.peft_only))
    _perturb_trained_extras(model)
    model.save_pretrained(directory)
    return logits(model)


@pytest.mark.parametrize("name", CASES)
def test_loraforge_to_peft(name, tmp_path):
    case = CASES[name]
    ours = _loraforge_adapter(case, tmp_path)
    assert max_abs_diff(ours, logits(BUILDERS[case.arch]())) > 1e-2  # non-trivial adapter
    theirs = peft.PeftModel.from_pretrained(BUILDERS[case.arch](), tmp_path).eval()
    assert max_abs_diff(logits(theirs), ours) <= FP32


@pytest.mark.parametrize("name", CASES)
def test_peft_to_loraforge(name, tmp_path):
    case = CASES[name]
    theirs = _peft_adapter(case, tmp_path)
    assert max_abs_diff(theirs, logits(BUILDERS[case.arch]())) > 1e-2
    ours = load_adapter(BUILDERS[case.arch](), tmp_path)
    assert max_abs_diff(logits(ours.model), theirs) <= FP32


def test_peft_saved_embedding_base_weight_is_loaded(tmp_path):
    # peft writes a targeted embedding's full base weight into the adapter and loads it back into the base
    # (for resized or trained embeddings); loraforge must do the same. Shift it so that skipping it shows.
    case = CASES["embedding"]
    torch.manual_seed(1)
    model = peft.get_peft_model(BUILDERS["llama"](), peft.LoraConfig(**_options(case)))
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.base_layer.weight.add_(0.5)
    model.save_pretrained(tmp_path)
    theirs = logits(model)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in load_file(tmp_path / "adapter_model.safetensors")
    assert max_abs_diff(logits(peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path)), theirs) <= FP32
    ours = load_adapter(BUILDERS["llama"](), tmp_path)
    assert max_abs_diff(logits(ours.model), theirs) <= FP32


@pytest.mark.parametrize("name", ["linear", "conv1d", "seq_cls", "patterns", "dora"])
def test_same_files_as_peft(name, tmp_path):
    # the same keys and shapes as peft's own file for the same config (peft adds the embedding base weight)
    case = CASES[name]
    _loraforge_adapter(case, tmp_path / "ours")
    _peft_adapter(case, tmp_path / "theirs")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    theirs.pop("base_model.model.model.embed_tokens.base_layer.weight", None)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("name", ["linear", "conv1d", "patterns", "seq_cls", "dora"])
def test_our_config_reads_in_peft(name, tmp_path):
    case = CASES[name]
    _loraforge_adapter(case, tmp_path)
    config = peft.PeftConfig.from_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    options = _options(case)
    assert config.peft_type == peft.PeftType.LORA == written["peft_type"]
    assert (config.r, config.lora_alpha) == (options["r"], options["lora_alpha"])
    assert set(config.target_modules) == set(options["target_modules"])
    assert config.task_type == options["task_type"]
    assert config.use_dora == options.get("use_dora", False)
    assert config.rank_pattern == options.get("rank_pattern", {})
    assert config.alpha_pattern == options.get("alpha_pattern", {})
    expected = options.get("modules_to_save")
    if options["task_type"] in ("SEQ_CLS", "TOKEN_CLS"):  # both add their head names, as PeftModelForSeq...Cls does
        expected = list(dict.fromkeys([*(expected or []), "classifier", "score"]))
    assert config.modules_to_save == expected


@pytest.mark.parametrize("name", ["dora", "dora_conv1d", "linear", "embedding"])
def test_merged_logits_match_peft_merge_and_unload(name, tmp_path):
    case = CASES[name]
    _peft_adapter(case, tmp_path)
    theirs = peft.PeftModel.from_pretrained(BUILDERS[case.arch](), tmp_path).merge_and_unload().eval()
    ours = load_adapter(BUILDERS[case.arch](), tmp_path)
    unmerged = logits(ours.model)
    ours.merge()
    assert max_abs_diff(logits(ours.model), logits(theirs)) <= FP32
    assert max_abs_diff(logits(ours.model), unmerged) <= FP32
    # and the merged weights themselves
    for path, layer in ours.layers.items():
        assert max_abs_diff(layer.base_layer.weight, theirs.get_submodule(path).weight) <= FP32, path
