"""End to end on the real default model (SmolLM2-135M-Instruct): loraforge and PEFT give the same greedy tokens.

Both directions: an adapter trained by `loraforge train`, loaded by `peft.PeftModel`; and an adapter made by PEFT,
loaded by loraforge. Greedy decoding is compared token for token.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from loraforge.cli import main
from loraforge.data import encode_prompt
from loraforge.demo import sample_path
from loraforge.infer import InferenceSession, SamplingParams, generate
from loraforge.lora import load_adapter
from loraforge.models import DEFAULT_MODEL, load_model

pytestmark = pytest.mark.integration
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def demo_prompt_ids() -> list[int]:
    _, tokenizer = load_model(DEFAULT_MODEL)
    record = json.loads(sample_path("e2e_demo_prompts.jsonl").read_text(encoding="utf-8").splitlines()[0])
    return encode_prompt(record["instruction"], record["input"], tokenizer)


def _peft_greedy(base_dir: Path, adapter: Path, prompt_ids: list[int], tokenizer) -> list[int]:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_loraforge_adapter_greedy_equals_peft(default_model_dir, demo_prompt_ids, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    code = main(["-q", "train", "--data", str(sample_path("e2e_demo.jsonl")), "--output", str(adapter),
                 "--max-steps", "4", "--batch-size", "4", "--max-length", "128", "--lr", "2e-3", "--seed", "0"])
    assert code == 0
    summary = json.loads((adapter / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_tokens"] > 0

    session = InferenceSession.open(adapters={"trained": adapter})
    tokenizer, params = session.tokenizer, SamplingParams(max_new_tokens=NEW_TOKENS)
    base_ids, _ = generate(session, demo_prompt_ids, params)
    ours, ours_text = generate(session, demo_prompt_ids, params, adapter="trained")
    theirs = _peft_greedy(default_model_dir, adapter, demo_prompt_ids, tokenizer)
    assert ours == theirs
    assert ours != base_ids, "the trained adapter should change the greedy answer"
    adapted = [path for path, layer in session.lora.layers.items() if layer.lora_a]
    assert len(adapted) == 60 and {p.rsplit(".", 1)[1] for p in adapted} == {"q_proj", "v_proj"}  # Llama default

    record = json.loads(sample_path("e2e_demo_prompts.jsonl").read_text(encoding="utf-8").splitlines()[0])
    capsys.readouterr()
    assert main(["-q", "generate", "--adapter", str(adapter), "--chat", "--greedy", "--max-new-tokens",
                 str(NEW_TOKENS), "--prompt", record["instruction"] + "\n\n" + record["input"]]) == 0
    assert capsys.readouterr().out.strip() == tokenizer.decode(theirs, skip_special_tokens=True).strip()


def test_peft_adapter_greedy_equals_loraforge(default_model_dir, demo_prompt_ids, tmp_path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32, local_files_only=True)
    peft_model = get_peft_model(base, PeftLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                     use_rslora=True))
    with torch.no_grad():  # a non-trivial adapter: B is zero after PEFT's init
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    _, tokenizer = load_model(DEFAULT_MODEL)
    theirs = _peft_greedy(default_model_dir, tmp_path / "peft_adapter", demo_prompt_ids, tokenizer)

    session = InferenceSession.open(DEFAULT_MODEL, {"peft": tmp_path / "peft_adapter"})
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    base_ids, _ = generate(session, demo_prompt_ids, params)
    ours, _ = generate(session, demo_prompt_ids, params, adapter="peft")
    assert ours == theirs
    assert ours != base_ids, "the perturbed adapter should change the greedy answer"
