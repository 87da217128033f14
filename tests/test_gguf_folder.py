"""GGUF out for a base with no GGUF of its own, and back in: another llama-architecture model, written from a
transformers folder by `export_merged_model`, run by llama.cpp and loaded back by loraforge (`--model FILE.gguf`).

The model is a small random Llama (2 layers, grouped-query heads, an untied head) with the default model's byte-level
BPE tokenizer, so llama.cpp and transformers can both read the tokenizer written into the file. Checked: llama.cpp
tokenizes as transformers does; its logits on the f32 export equal loraforge's merged model's within llama.cpp's own
rounding (an f16 KV cache: under 1% of what the update moves); loraforge's load of each export is the merged model (f32: to float rounding) or the
file's blocks dequantized (q8_0, q4_1), so the round trip closes.
"""
from __future__ import annotations

import gguf
import llama_cpp  # a missing build fails here, loudly: the dev extras build it
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from loraforge.cli import main
from loraforge.export.gguf import _ggml_rows, export_merged_model, gguf_names
from loraforge.lora import LoraConfig, LoraModel, load_adapter, save_adapter
from loraforge.models import load_model

pytestmark = pytest.mark.integration
TEXTS = ["The coffee shop near the river serves cheap English food.",
         "Write a short note about topic number 7: the city centre has 12 pubs!",
         "name[The Punter], eatType[restaurant], food[Italian], priceRange[high]"]


@pytest.fixture(scope="module")
def exported(default_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_folder")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base, _ = load_model(str(root / "base"))
    torch.manual_seed(1)
    lora = LoraModel(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                      base_model_name_or_path=str(root / "base")))
    for p in lora.adapter_parameters().values():  # a visible update
        p.data.mul_(4.0)
    save_adapter(lora, root / "adapter")
    merged, _ = load_model(str(root / "base"))
    load_adapter(merged, root / "adapter").merge()
    base, _ = load_model(str(root / "base"))
    files = {q: export_merged_model(root / "adapter", base, tokenizer, root / f"merged-{q}.gguf", quant=q)
             for q in ("f32", "q8_0", "q4_1")}
    ids = [tokenizer(t).input_ids for t in TEXTS]
    return root, tokenizer, merged.eval(), base, files, ids


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def test_llama_cpp_reads_the_tokenizer_as_transformers_does(exported) -> None:
    _, tokenizer, _, _, files, ids = exported
    llm = llama_cpp.Llama(model_path=str(files["f32"].path), vocab_only=True, verbose=False)
    for text, expected in zip(TEXTS, ids):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == expected


def test_llama_cpp_runs_the_f32_export_as_the_merged_model(exported) -> None:
    _, _, merged, base, files, ids = exported
    llm = llama_cpp.Llama(model_path=str(files["f32"].path), n_ctx=256, logits_all=True, verbose=False, n_threads=1,
                          seed=0)
    for row in ids:
        llm.reset()
        llm.eval(row)
        theirs = torch.from_numpy(np.array(llm.scores[:len(row)])).float()
        ours, plain = _logits(merged, row), _logits(base, row)
        error, moved = (theirs - ours).abs().max().item(), (ours - plain).abs().max().item()
        print(f"llama.cpp vs loraforge, f32 export: max |logit error| {error:.2e} (the update moves logits by "
              f"{moved:.2e})")
        assert error < 0.01 * moved  # llama.cpp keeps K and V in f16: ~1e-3 here
        assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    assert files["f32"].retention == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("quant", ["f32", "q8_0", "q4_1"])
def test_loraforge_loads_the_export_back(exported, quant) -> None:
    """Every weight loraforge reads back is the file's tensor dequantized (q and k back in transformers' row order),
    so the loaded model is the export itself; f32 is the merged model to float rounding."""
    _, _, merged, _, files, ids = exported
    back, tokenizer = load_model(str(files[quant].path))
    assert tokenizer(TEXTS[0]).input_ids == ids[0]
    stored = {t.name: t for t in gguf.GGUFReader(files[quant].path).tensors}
    names = gguf_names(back.config, back.config.num_hidden_layers)
    for key, weight in back.state_dict().items():
        tensor = stored[names.get_name(key, try_suffixes=(".weight",))]
        expected = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(weight.shape)
        ours = _ggml_rows(tensor.name, weight.float(), back.config) if weight.dim() == 2 else weight.float()
        assert torch.equal(ours, torch.from_numpy(expected.astype(np.float32))), key
    if quant == "f32":
        for row in ids:
            torch.testing.assert_close(_logits(back, row), _logits(merged, row), atol=1e-5, rtol=1e-5)
    else:  # what the blocks kept of the trained update: cosine with it, over every adapted weight
        assert files[quant].retention > (0.99 if quant == "q8_0" else 0.5), files[quant].retention


def test_cli_exports_a_folder_base_merged_and_refuses_a_bare_adapter(exported, tmp_path, capsys) -> None:
    root = exported[0]
    assert main(["export", "--adapter", str(root / "adapter"), "--merged", "--quant", "q8_0",
                 "--output", str(tmp_path / "m.gguf")]) == 0
    assert "merged model written" in capsys.readouterr().out
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == "llama"
    assert main(["export", "--adapter", str(root / "adapter"), "--output", str(tmp_path / "a.gguf")]) == 2
    assert "--merged" in capsys.readouterr().err
