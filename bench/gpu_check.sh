#!/usr/bin/env bash
# The one place for GPU checks: everything loraforge claims on a CUDA GPU, in under 8 minutes on one GPU.
#
#   bash bench/gpu_check.sh            # from the repository root, with the venv built (make install)
#
# 1. the CUDA-marked tests (tests/test_cuda.py): golden losses, a PEFT round trip and the decode engine on the GPU;
# 2. training tokens/s and peak GPU memory against PEFT + transformers Trainer on the same GPU, same config:
#    the default model, then a 1B-class Llama built from random weights (no bigger model is on disk);
# Later capabilities (QLoRA, serving) add their GPU checks here.
set -euo pipefail
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

echo "== 1. CUDA tests"
$PY -m pytest -q -m cuda tests/test_cuda.py

echo "== 2a. training throughput and peak memory vs PEFT + Trainer: default model"
$PY bench/train_throughput.py --device cuda --steps 30 --batch-size 16 --max-length 512

echo "== 2b. the same on a 1B-class Llama (random weights, SmolLM2's tokenizer)"
BIG=$(mktemp -d)/llama-1b
$PY - "$BIG" <<'PY'
import sys
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from loraforge.models import DEFAULT_MODEL, resolve_model

tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
config = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                     tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
model.save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
PY
$PY bench/train_throughput.py --device cuda --model "$BIG" --steps 20 --batch-size 8 --max-length 512 \
    --targets all-linear
