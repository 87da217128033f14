"""PiSSA starts (`init_lora_weights="pissa"`, `lora_init: pissa`): equal to PEFT's, the model unchanged at step 0, and
saved as an ordinary rank-2r adapter on the original base (PEFT's weight conversion) that loraforge and PEFT load with
the trained model's logits.

Oracle: the real `peft` package on the same tiny models: its PiSSA start (A, B and the residual base weight) and its
`save_pretrained(..., path_initial_model_for_weight_conversion=...)` tensors."""
from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from helpers import BUILDERS, logits
from loraforge.config import TrainConfig
from loraforge.errors import LoraforgeError
from loraforge.lora import LoraConfig, LoraModel, load_adapter, save_adapter
from loraforge.lora.layer import LoraLinear

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def _ours(arch: str, **options) -> tuple[torch.nn.Module, LoraModel]:
    base = BUILDERS[arch](0)
    return base, LoraModel(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch],
                                                           init_lora_weights="pissa", **options))


def _peft(arch: str, **options) -> peft.PeftModel:
    extra = {"fan_in_fan_out": True} if arch == "gpt2" else {}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights="pissa", **extra,
                             **options)
    return peft.get_peft_model(BUILDERS[arch](0), config)


def _train_a_little(params: dict[str, torch.Tensor], seed: int = 7) -> None:
    """Stand-in for training: move every A and B by a seeded amount."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(params):
            params[name].add_(0.05 * torch.randn(params[name].shape, generator=gen))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_start_equals_peft_and_leaves_the_model_unchanged(arch) -> None:
    base, lm = _ours(arch)
    theirs = _peft(arch)
    state = theirs.state_dict()
    for path, layer in lm.layers.items():
        prefix = f"base_model.model.{path}"
        torch.testing.assert_close(layer.lora_A.weight, state[f"{prefix}.lora_A.default.weight"], atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.lora_B.weight, state[f"{prefix}.lora_B.default.weight"], atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, state[f"{prefix}.base_layer.weight"], atol=1e-6, rtol=0)
        # the start is W's top-r part: s·B A plus the residual base is W
        w = base.get_submodule(path).weight
        torch.testing.assert_close(layer.base_layer.weight + layer.delta_weight(), w, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(lm.model), logits(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, rslora", [("llama", False), ("gpt2", False), ("llama", True)])
def test_saved_adapter_is_the_trained_model_on_the_original_base(arch, rslora, tmp_path) -> None:
    base, lm = _ours(arch, use_rslora=rslora, rank_pattern={"v_proj": 2} if arch == "llama" else {})
    _train_a_little({k: p for k, p in lm.adapter_parameters().items()})
    trained = logits(lm.model)
    save_adapter(lm, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if rslora else 2))
    # loraforge, on a fresh copy of the ORIGINAL base
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh), trained, atol=1e-5, rtol=0)
    # PEFT, on a fresh original base
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(logits(theirs), trained, atol=1e-5, rtol=0)


def test_conversion_equals_peft_weight_conversion(tmp_path) -> None:
    """PEFT: save the start, train, save with path_initial_model_for_weight_conversion; loraforge: the same moves
    on its own start, save_adapter. The same tensors."""
    theirs = _peft("llama")
    theirs.peft_config["default"].init_lora_weights = True  # how PEFT's docs save the start for the conversion
    theirs.save_pretrained(tmp_path / "init")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    _train_a_little({n.replace(".default", "").removeprefix("base_model.model."): p
                     for n, p in theirs.named_parameters() if "lora_" in n})
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    _, lm = _ours("llama")
    _train_a_little({k: p for k, p in lm.adapter_parameters().items()})
    save_adapter(lm, tmp_path / "ours")
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(ours) == set(peft_tensors)
    for key in ours:
        torch.testing.assert_close(ours[key], peft_tensors[key], atol=1e-6, rtol=0)
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (our_config["r"], our_config["lora_alpha"]) == (peft_config["r"], peft_config["lora_alpha"])


def test_refusals() -> None:
    from loraforge.quant.model import quantize_model

    model = BUILDERS["llama"](0)
    quantize_model(model, "nf4")
    with pytest.raises(LoraforgeError, match="packed"):
        LoraModel(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(LoraforgeError, match="DoRA"):
        LoraModel(BUILDERS["llama"](0), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                   init_lora_weights="pissa"))
    with pytest.raises(LoraforgeError, match="embedding"):
        LoraModel(BUILDERS["llama"](0), LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights="pissa"))
    with pytest.raises(LoraforgeError, match="quantize none"):
        TrainConfig(data="x.jsonl", lora_init="pissa", quantize="nf4")


def test_training_saves_the_converted_adapter_and_checkpoints_as_trained(llama_dir, data_file, tmp_path) -> None:
    from loraforge.train import train

    cfg = TrainConfig(model=str(llama_dir), data=str(data_file), output=str(tmp_path / "run"), max_steps=2,
                      batch_size=2, max_length=32, r=4, lora_alpha=8, lora_init="pissa", save_every=1,
                      target_modules=["q_proj", "v_proj"], lr=1e-2, dtype="float32")
    result = train(cfg, progress=False)
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])  # words of the tiny tokenizer
    trained = logits(result.lora.model, ids)
    final = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    step = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "adapter_config.json").read_text())
    assert (final["r"], step["r"], step["init_lora_weights"]) == (8, 4, "pissa")
    from loraforge.models import load_model

    fresh, _ = load_model(str(llama_dir))
    load_adapter(fresh, tmp_path / "run")
    torch.testing.assert_close(logits(fresh, ids), trained, atol=1e-5, rtol=0)
    assert any(isinstance(m, LoraLinear) and m.pissa_start is not None for m in result.lora.model.modules())


def test_an_unconverted_peft_pissa_adapter(tmp_path) -> None:
    """PEFT's save_pretrained without the conversion keeps init_lora_weights="pissa": load_adapter re-derives the
    moved base (the start is deterministic) and gives PEFT's logits; the serving session, which adds to the base
    itself, refuses it with the way out."""
    from helpers import session_of

    theirs = _peft("llama")
    _train_a_little({n: p for n, p in theirs.named_parameters() if "lora_" in n})
    theirs.save_pretrained(tmp_path / "raw")
    expected = logits(theirs)
    fresh = BUILDERS["llama"](0)
    load_adapter(fresh, tmp_path / "raw")
    torch.testing.assert_close(logits(fresh), expected, atol=1e-5, rtol=0)
    with pytest.raises(LoraforgeError, match="PiSSA adapter saved as trained"):
        session_of(BUILDERS["llama"](0), None, raw=tmp_path / "raw")
