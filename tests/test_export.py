"""GGUF export (export/): every rule llama.cpp's adapter loader checks, read back with `gguf.GGUFReader`; the update
in the file equals the trained one; a merged file keeps the base's tokenizer and untouched tensors and loads back.

These run on the default model's own GGUF (integration): an adapter is only meaningful against its base file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader, quants

from loraforge.errors import LoraforgeError
from loraforge.export.gguf import export_adapter, export_merged, permute_rows
from loraforge.lora import LoraConfig, LoraModel, save_adapter
from loraforge.models import DEFAULT_MODEL, gguf_file_of, load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base(default_model_dir):
    model, tokenizer = load_model(DEFAULT_MODEL)
    return model, tokenizer, gguf_file_of(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """A non-trivial adapter on the default model: rsLoRA, a rank and an alpha pattern, q/k (permuted) and MLP."""
    model, _, _ = base
    torch.manual_seed(0)
    lm = LoraModel(model, LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj",
                                                                                            "down_proj"],
                                     rank_pattern={"down_proj": 4}, alpha_pattern={"k_proj": 3.0},
                                     init_lora_weights=False, base_model_name_or_path=DEFAULT_MODEL))
    for layer in lm.layers.values():
        with torch.no_grad():
            layer.lora_B.weight.mul_(0.05)  # an update of a few % of the weight, as training makes
    folder = save_adapter(lm, tmp_path_factory.mktemp("adapter") / "a")
    deltas = {path: layer.delta_weight() for path, layer in lm.layers.items()}
    lm.unload()
    return folder, deltas


def _fields(reader: GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def test_permutation_is_llama_cpps(base):
    """The base file's q and k blocks, dequantized, are transformers' weights with llama.cpp's row permutation."""
    model, _, path = base
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    for name, module, heads in (("attn_q", "q_proj", 9), ("attn_k", "k_proj", 3)):
        t = tensors[f"blk.2.{name}.weight"]
        file_weight = torch.from_numpy(quants.dequantize(t.data, t.tensor_type))
        ours = getattr(model.model.layers[2].self_attn, module).weight.detach()
        assert torch.equal(permute_rows(ours, heads), file_weight)
        assert not torch.equal(ours, file_weight)  # the permutation is not the identity


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_adapter_file_follows_llama_cpps_loader_rules(base, adapter, tmp_path, dtype):
    model, _, base_path = base
    folder, deltas = adapter
    result = export_adapter(folder, tmp_path / "a.gguf", dtype=dtype)
    reader = GGUFReader(result.path)
    fields = _fields(reader)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == _fields(GGUFReader(base_path))["general.architecture"] == "llama"
    alpha = fields["adapter.lora.alpha"]
    assert alpha == 16.0
    base_tensors = {t.name: t for t in GGUFReader(base_path).tensors}
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(deltas) == result.tensors
    heads = {"attn_q": 9, "attn_k": 3}
    for path, delta in deltas.items():
        layer = int(path.split(".")[2])
        kind = {"q_proj": "attn_q", "k_proj": "attn_k", "down_proj": "ffn_down"}[path.rsplit(".", 1)[-1]]
        name = f"blk.{layer}.{kind}.weight"
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        ref = base_tensors[name]  # llama-adapter.cpp: a.ne[0] == base ne[0], b.ne[1] == base ne[1], a.ne[1] == b.ne[0]
        assert a.shape[0] == ref.shape[0] and b.shape[1] == ref.shape[1] and a.shape[1] == b.shape[0]
        rank = int(b.shape[0])
        a_val = torch.from_numpy(quants.dequantize(a.data, a.tensor_type).astype(np.float32))
        b_val = torch.from_numpy(quants.dequantize(b.data, b.tensor_type).astype(np.float32))
        in_file = b_val @ a_val * (alpha / rank)  # what llama.cpp adds
        want = permute_rows(delta, heads[kind]) if kind in heads else delta
        tolerance = {"f32": 1e-6, "f16": 2e-3, "q8_0": 2e-2}[dtype]
        assert float((in_file - want).norm() / want.norm()) < tolerance


def test_what_llama_cpp_cannot_load_is_refused(base, tmp_path):
    model, _, _ = base
    for options, words in ((dict(use_dora=True), "DoRA"), (dict(target_modules=["embed_tokens"]), "embedding"),
                           (dict(target_modules=["lm_head"]), "tied")):
        lm = LoraModel(model, LoraConfig(r=2, lora_alpha=4, base_model_name_or_path=DEFAULT_MODEL, **options))
        folder = save_adapter(lm, tmp_path / words)
        lm.unload()
        with pytest.raises(LoraforgeError, match=words):
            export_adapter(folder, tmp_path / f"{words}.gguf")


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_1"])
def test_merged_file_keeps_the_base_and_holds_the_update(base, adapter, tmp_path, quant):
    model, _, base_path = base
    folder, deltas = adapter
    result = export_merged(folder, base_path, tmp_path / "m.gguf", quant=quant, base_model=model)
    source, merged = GGUFReader(base_path), GGUFReader(result.path)
    src_fields, fields = _fields(source), _fields(merged)
    assert {k: v for k, v in fields.items() if k != "general.file_type"} == \
        {k: v for k, v in src_fields.items() if k != "general.file_type"}  # tokenizer, chat template, hparams
    adapted = {f"blk.{p.split('.')[2]}.{ {'q_proj': 'attn_q', 'k_proj': 'attn_k', 'down_proj': 'ffn_down'}[p.rsplit('.', 1)[-1]]}.weight"
               for p in deltas}
    source_tensors = {t.name: t for t in source.tensors}
    for t in merged.tensors:
        if t.name not in adapted:  # untouched: the base file's own bytes
            assert np.array_equal(np.asarray(t.data), np.asarray(source_tensors[t.name].data))
    # the retention of the update: exact types keep it all, 4-bit re-quantization loses most of it
    assert result.retention > {"f16": 0.999, "q8_0": 0.8, "q4_1": 0.0}[quant]
    if quant == "q4_1":
        assert result.retention < 0.8


@pytest.mark.parametrize("quant, worst", [("f16", 0.1), ("q8_0", 1.5)])
def test_merged_file_loads_back_as_the_merged_model(base, adapter, tmp_path, quant, worst):
    """GGUF in, closing the round trip: the merged file loads as a model whose logits are base + update's (O(10)
    logits; f16 and Q8_0 re-encode the adapted weights only)."""
    from loraforge.lora import load_adapter

    model, tokenizer, base_path = base
    folder, _ = adapter
    path = export_merged(folder, base_path, tmp_path / f"merged-{quant}.gguf", quant=quant, base_model=model).path
    loaded, _ = load_model(str(path))
    fresh, _ = load_model(DEFAULT_MODEL)
    lm = load_adapter(fresh, folder)
    ids = tokenizer("The Golden Curry is a restaurant near the river.", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got, plain = lm.model(ids).logits, loaded(ids).logits, model(ids).logits
    print(f"merged {quant}: max |logit difference| {float((got - want).abs().max()):.3f}")
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert float((got - want).abs().max()) < worst < float((plain - want).abs().max())  # nearer than the base


def test_cli_export_with_ollama_modelfile(base, adapter, tmp_path):
    from loraforge.cli import main

    _, _, base_path = base
    folder, _ = adapter
    out = tmp_path / "out" / "a.gguf"
    assert main(["export", "--adapter", str(folder), "--output", str(out), "--ollama"]) == 0
    modelfile = (out.parent / "Modelfile").read_text()
    assert f"FROM {base_path.resolve()}" in modelfile and f"ADAPTER {out.resolve()}" in modelfile
    assert "<|im_start|>assistant" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert oct(out.stat().st_mode & 0o777) != "0o600"  # readable by Ollama's service user (the umask decides)
