"""A Llama with random weights, saved as a transformers folder, for GPU benchmarks where the weights are not on disk.

    python bench/random_model.py --like DIR --output OUT            # DIR's architecture (its config.json) and tokenizer
    python bench/random_model.py --size 1b --like DIR --output OUT  # a 1B-class Llama with DIR's tokenizer

Throughput and peak memory depend on the shapes, not on the values, so a model with the default model's config and
random weights measures what the default model would (the device machine cannot hold the 98 MB GGUF: its transfer
limit is 64 MiB). `--like` defaults to the default model's folder where it is installed.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def llama_1b(tokenizer) -> LlamaConfig:
    """TinyLlama-1.1B's shapes (22 layers, 2048 wide, grouped-query 32/4 heads) with the given tokenizer's vocab."""
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--like", help="a folder with config.json and the tokenizer (default: the default model's)")
    p.add_argument("--size", choices=["like", "1b"], default="like")
    p.add_argument("--output", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.like is None:
        from loraforge.models import DEFAULT_MODEL, resolve_model
        a.like = str(resolve_model(DEFAULT_MODEL))
    like, out = Path(a.like), Path(a.output)
    tokenizer = AutoTokenizer.from_pretrained(like)
    config = llama_1b(tokenizer) if a.size == "1b" else AutoConfig.from_pretrained(like)
    torch.manual_seed(0)
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (like / name).exists():
            shutil.copy(like / name, out / name)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, random weights")


if __name__ == "__main__":
    main()
