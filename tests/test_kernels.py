"""The lean training forwards (loraforge.train.kernels): same values and gradients as transformers' modules, and
less kept for backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from helpers import tiny_gpt2, tiny_llama, token_ids
from loraforge.lora import LoraConfig, LoraModel
from loraforge.train.kernels import (PACKED_ATTENTION, RMSNormFunction, Segments, SwiGLUFunction,
                                     packed_attention_on, packed_attention_supported, patched_for_training,
                                     segment_lengths, varlen_attention)
from loraforge.train.loss import token_loss_sum
from tolerances import max_abs_diff


def _saved_bytes(model: torch.nn.Module, fn) -> int:
    """Bytes autograd keeps for backward while fn() runs: each storage once, the model's parameters not counted."""
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rms_norm_matches_llama_and_gradcheck(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(24, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 24))
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    ref = norm(x)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, norm.weight), grad)
    ours = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    our_grads = torch.autograd.grad(ours, (x, norm.weight), grad)
    assert torch.equal(ours, ref)  # forward: the same ops
    # LlamaRMSNorm computes in fp32 whatever the input dtype, and so does the kernel: fp32-level agreement
    tol = 1e-6 if dtype == torch.float64 else 2e-2
    for a, b in zip(our_grads, ref_grads):
        assert max_abs_diff(a, b) <= tol * max(1.0, b.abs().max().item()), (dtype, max_abs_diff(a, b))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_swiglu_matches_autograd_and_gradcheck(dtype):
    gate = torch.randn(4, 6, 32, dtype=dtype, requires_grad=True)
    up = torch.randn(4, 6, 32, dtype=dtype, requires_grad=True)
    ref = torch.nn.functional.silu(gate) * up
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (gate, up), grad)
    ours = SwiGLUFunction.apply(gate, up)
    our_grads = torch.autograd.grad(ours, (gate, up), grad)
    assert torch.equal(ours, ref)
    tol = 1e-12 if dtype == torch.float64 else 3e-2
    for a, b in zip(our_grads, ref_grads):
        assert max_abs_diff(a, b) <= tol * max(1.0, b.abs().max().item()), max_abs_diff(a, b)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(SwiGLUFunction.apply, (gate, up))


def _lora_llama(dtype: torch.dtype) -> LoraModel:
    model = tiny_llama().to(dtype)
    return LoraModel(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj",
                                                                          "down_proj"], init_lora_weights=False))


def _batch() -> dict[str, torch.Tensor]:
    ids = token_ids(batch=2, length=12)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "labels": labels}


def test_patched_llama_same_loss_and_lora_grads_fp64():
    lm = _lora_llama(torch.float64)
    lm.model.train()
    params = list(lm.adapter_parameters().values())
    ref_loss, _ = token_loss_sum(lm.model, _batch())
    ref_grads = torch.autograd.grad(ref_loss, params)
    with patched_for_training(lm.model) as n:
        # 2 layers x (2 norms + 1 MLP) + the final norm
        assert n == 7
        loss, _ = token_loss_sum(lm.model, _batch())
        grads = torch.autograd.grad(loss, params)
    assert loss.item() == ref_loss.item()  # forward: the same ops
    for a, b in zip(grads, ref_grads):  # the norms compute in fp32 (as LlamaRMSNorm does): fp32-level agreement
        assert max_abs_diff(a, b) < 1e-6 * b.abs().max().item()
    assert "forward" not in vars(lm.model.model.norm)  # restored on exit


def test_patched_llama_keeps_less_for_backward_bf16():
    lm = _lora_llama(torch.bfloat16)
    lm.model.train()
    plain = _saved_bytes(lm.model, lambda: token_loss_sum(lm.model, _batch()))
    with patched_for_training(lm.model):
        lean = _saved_bytes(lm.model, lambda: token_loss_sum(lm.model, _batch()))
    # per layer and token the norms drop 2 x 16 x 2 bytes (fp32 copy -> bf16 input) and the MLP 32 x 2 (silu kept)
    assert lean < plain
    tokens = 2 * 12
    assert plain - lean >= 2 * tokens * (2 * 16 * 2 + 32 * 2), (plain, lean)


def test_models_without_llama_blocks_are_left_alone():
    model = tiny_gpt2()
    assert isinstance(model, GPT2LMHeadModel)
    with patched_for_training(model) as n:
        assert n == 0



# ---- packed attention -------------------------------------------------------------------------------------------
PACKED_IDS = token_ids(batch=2, length=10, seed=3)
PACKED_POSITIONS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])


def test_segment_lengths():
    assert segment_lengths(PACKED_POSITIONS) == [4, 3, 3, 6, 4]
    assert segment_lengths(torch.tensor([[0, 1, 2], [0, 0, 1]])) == [3, 1, 2]
    assert segment_lengths(torch.tensor([[3, 4, 0, 1]])) == [2, 2]  # a row start is a start even without a 0


def test_segments_are_found_once_a_batch():
    segments = Segments.of(PACKED_POSITIONS)
    assert segments.lengths == [4, 3, 3, 6, 4] and segments.max_len == 6
    assert segments.cu_seqlens.dtype == torch.int32 and segments.cu_seqlens.tolist() == [0, 4, 7, 10, 16, 20]


def _varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch >= 2.11's varlen_attn contract on the CPU (the real kernel is CUDA-only; tests/test_cuda.py runs it):
    (N, H, D) layouts, examples cut at cu_q, causal when window_size == (-1, 0)."""
    assert cu_q is cu_k and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    assert enable_gqa or k.shape[1] == q.shape[1]
    causal = tuple(window_size) == (-1, 0)
    starts = cu_q.tolist()
    return torch.cat([F.scaled_dot_product_attention(
        q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=causal, scale=scale,
        enable_gqa=enable_gqa).transpose(0, 1) for a, b in zip(starts, starts[1:])])


def _varlen_stand_in_2_10(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=False):
    """torch 2.10's contract: is_causal, and no enable_gqa (key/value heads come repeated)."""
    return _varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale,
                            window_size=(-1, 0) if is_causal else (-1, -1))


@pytest.mark.parametrize("kernel", [_varlen_stand_in, _varlen_stand_in_2_10])
def test_varlen_attention_is_each_example_alone(kernel):
    # the wiring (layouts, cu_seqlens, causal flag, grouped-query heads) against plain causal SDPA per example
    gen = torch.Generator().manual_seed(0)
    segments = Segments.of(PACKED_POSITIONS)
    N, H, Hkv, D = 20, 4, 2, 8
    q, k, v = (torch.randn(N, h, D, generator=gen) for h in (H, Hkv, Hkv))
    out = varlen_attention(q, k, v, segments, 0.3, kernel=kernel)
    starts = segments.cu_seqlens.tolist()
    for a, b in zip(starts, starts[1:]):
        alone = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                               v[a:b].transpose(0, 1), is_causal=True, scale=0.3, enable_gqa=True)
        assert max_abs_diff(out[a:b], alone.transpose(0, 1)) < 1e-6


def test_packed_attention_segments_from_the_batch_give_the_same_logits():
    lm = _lora_llama(torch.float32)
    assert packed_attention_supported(lm.model)
    with packed_attention_on(lm.model):
        per_layer = lm.model(input_ids=PACKED_IDS, position_ids=PACKED_POSITIONS, use_cache=False).logits
    with packed_attention_on(lm.model, PACKED_POSITIONS):
        once = lm.model(input_ids=PACKED_IDS, position_ids=PACKED_POSITIONS, use_cache=False).logits
    assert torch.equal(once, per_layer)


def test_packed_attention_is_each_example_alone():
    # ground truth: every packed example run on its own, unpadded
    lm = _lora_llama(torch.float32)
    assert packed_attention_supported(lm.model)
    with packed_attention_on(lm.model):
        assert lm.model.config._attn_implementation == PACKED_ATTENTION
        packed = lm.model(input_ids=PACKED_IDS, position_ids=PACKED_POSITIONS, use_cache=False).logits
    assert lm.model.config._attn_implementation == "sdpa"  # restored
    for row, start, length in [(0, 0, 4), (0, 4, 3), (0, 7, 3), (1, 0, 6), (1, 6, 4)]:
        alone = lm.model(input_ids=PACKED_IDS[row:row + 1, start:start + length], use_cache=False).logits
        assert max_abs_diff(packed[row:row + 1, start:start + length], alone) < 1e-5


def test_packed_attention_same_loss_and_grads_as_block_mask():
    lm = _lora_llama(torch.float32)
    lm.model.train()
    params = list(lm.adapter_parameters().values())
    batch = {"input_ids": PACKED_IDS, "position_ids": PACKED_POSITIONS, "labels": PACKED_IDS}
    ref_loss, _ = token_loss_sum(lm.model, batch)  # transformers' block-diagonal mask
    ref_grads = torch.autograd.grad(ref_loss, params)
    assert packed_attention_supported(lm.model)
    with patched_for_training(lm.model), packed_attention_on(lm.model):
        loss, _ = token_loss_sum(lm.model, batch)
        grads = torch.autograd.grad(loss, params)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for a, b in zip(grads, ref_grads):
        assert max_abs_diff(a, b) < 1e-5 * max(1.0, b.abs().max().item())


def test_packed_attention_gpt2_keeps_what_agrees():
    # whatever the probe decides for GPT-2, packed logits under the patch equal its own
    model = tiny_gpt2()
    ref = model(input_ids=PACKED_IDS, position_ids=PACKED_POSITIONS, use_cache=False).logits
    with packed_attention_on(model) if packed_attention_supported(model) else patched_for_training(model):
        out = model(input_ids=PACKED_IDS, position_ids=PACKED_POSITIONS, use_cache=False).logits
    assert max_abs_diff(out, ref) < 1e-5
