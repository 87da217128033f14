"""The CUDA path, run by bench/gpu_check.sh on a GPU (`pytest -m cuda`); `make test` deselects them (pyproject's
addopts), so a CPU machine never runs them, and a GPU run that cannot reach CUDA fails instead of skipping.

- the golden loss list (tests/golden/tiny_llama_losses.json, fp32 on the CPU) trained on the GPU in fp32: within 1e-4
  (TF32 is off in fp32 training; cuBLAS reduces in another order than MKL);
- a PEFT round trip on the GPU: our adapter loaded by PEFT gives our logits within the fp32 tolerance;
- the decode engine on the GPU gives the CPU's greedy tokens;
- packed attention in bf16 runs torch's varlen flash attention, equal to each example alone.
- QLoRA: the golden NF4 losses, a packed layer (forward and input gradient), and greedy decoding on a packed base
  equal the CPU's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraforge.config import TrainConfig
from loraforge.train import train
from tolerances import FP32, max_abs_diff

pytestmark = pytest.mark.cuda
GOLDEN = Path(__file__).parent / "golden" / "tiny_llama_losses.json"


def test_cuda_is_there():
    assert torch.cuda.is_available(), "the cuda tests need a CUDA GPU (bench/gpu_check.sh runs them on one)"


def test_golden_losses_on_cuda(llama_dir, data_file, tmp_path):
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    cfg = TrainConfig(model=str(llama_dir), data=str(data_file), output=str(tmp_path / "o"), device="cuda",
                      **golden["options"])
    summary = train(cfg, progress=False).summary
    assert summary["steps"] == len(golden["losses"])
    assert max(abs(a - b) for a, b in zip(summary["losses"], golden["losses"])) <= 1e-4
    assert summary["peak_memory_mb"] > 0 and summary["peak_memory_mb"] != summary["peak_rss_mb"]


def test_peft_round_trip_on_cuda(tmp_path):
    import peft

    from helpers import tiny_llama
    from loraforge.lora import LoraConfig, LoraModel, save_adapter

    torch.manual_seed(0)
    lm = LoraModel(tiny_llama().cuda(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights=False))
    folder = save_adapter(lm, tmp_path / "a")
    ids = torch.randint(4, 60, (2, 9), device="cuda")
    with torch.no_grad():
        ours = lm.model(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(tiny_llama().cuda(), str(folder)).eval()(input_ids=ids).logits
    assert max_abs_diff(ours, theirs) <= FP32


def test_varlen_attention_on_cuda_equals_each_example_alone():
    import torch.nn.functional as F

    from loraforge.train.kernels import Segments, varlen_applies, varlen_attention

    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]], device="cuda")
    segments = Segments.of(positions)
    q, k, v = (torch.randn(20, h, 64, generator=gen).to("cuda", torch.bfloat16) for h in (8, 2, 2))
    assert varlen_applies(q)
    out = varlen_attention(q, k, v, segments, 0.125)
    starts = segments.cu_seqlens.tolist()
    for a, b in zip(starts, starts[1:]):
        alone = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                               v[a:b].transpose(0, 1), is_causal=True, scale=0.125,
                                               enable_gqa=True).transpose(0, 1)
        assert max_abs_diff(out[a:b].float(), alone.float()) <= 2e-2  # bf16


def test_packed_attention_in_bf16_on_cuda_agrees_with_the_models_own(llama_dir):
    from transformers import AutoModelForCausalLM

    from loraforge.train.kernels import packed_attention_supported

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).cuda()
    assert packed_attention_supported(model)  # the probe ran the varlen kernel against the model's own attention


def test_engine_on_cuda_gives_the_cpus_greedy_tokens(llama_dir):
    from loraforge.infer import InferenceSession, SamplingParams, generate_many

    prompts = [[1, 5, 6, 7], [1, 9, 10], [1, 11, 12, 13, 14]]
    params = SamplingParams(max_new_tokens=12)
    cpu = generate_many(InferenceSession.open(str(llama_dir)), prompts, params)
    gpu = generate_many(InferenceSession.open(str(llama_dir), device="cuda"), prompts, params)
    assert gpu == cpu


# ---- QLoRA on the GPU -------------------------------------------------------------------------------------------
def test_golden_nf4_losses_on_cuda(llama_dir, data_file, tmp_path):
    """QLoRA (nf4, packed on the CPU at load, moved to the GPU with the model) gives the CPU's golden losses."""
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    cfg = TrainConfig(model=str(llama_dir), data=str(data_file), output=str(tmp_path / "o"), device="cuda",
                      **golden["nf4_options"])
    losses = train(cfg, progress=False).summary["losses"]
    assert max(abs(a - b) for a, b in zip(losses, golden["nf4_losses"])) <= 1e-4


@pytest.mark.parametrize("fmt", ["nf4", "nf4-dq"])
def test_packed_layer_on_cuda_is_the_cpus(fmt):
    from torch import nn

    from loraforge.quant.linear import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(576, 192).requires_grad_(False), fmt)
    x = torch.randn(4, 576, requires_grad=True)
    cpu = layer(x)
    (grad_cpu,) = torch.autograd.grad(cpu.sum(), x)
    xg = x.detach().cuda().requires_grad_(True)
    gpu = layer.cuda()(xg)
    (grad_gpu,) = torch.autograd.grad(gpu.sum(), xg)
    assert torch.equal(layer.dequantize().cpu(), layer.cpu().dequantize())  # unpacking is exact on both
    assert max_abs_diff(gpu.cpu(), cpu) <= FP32 and max_abs_diff(grad_gpu.cpu(), grad_cpu) <= FP32


def test_engine_on_a_packed_base_on_cuda_gives_the_cpus_greedy_tokens(llama_dir):
    from loraforge.infer import InferenceSession, SamplingParams, generate_many

    prompts = [[1, 5, 6, 7], [1, 9, 10], [1, 11, 12, 13, 14]]
    params = SamplingParams(max_new_tokens=12)
    cpu = generate_many(InferenceSession.open(str(llama_dir), quantize="nf4"), prompts, params)
    gpu = generate_many(InferenceSession.open(str(llama_dir), quantize="nf4", device="cuda"), prompts, params)
    assert gpu == cpu
