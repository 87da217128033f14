"""Training forwards for Llama-family blocks: less kept for backward, and attention without the packed mask.

Profile of one step on the default model (`python bench/profile_step.py --time`): activations saved for backward
are most of the memory, and masked attention is a third of the time. Three replacements:

- RMSNorm upcasts its input to fp32 and autograd keeps that fp32 copy (4 bytes per element). `RMSNormFunction`
  keeps the input in its own dtype and one fp32 scale per row, and redoes the fp32 arithmetic in backward.
- The SwiGLU MLP keeps silu(gate) next to gate and up. `SwiGLUFunction` keeps gate and up only and recomputes silu
  (one elementwise op) in backward.
- Packed rows get a block-diagonal mask from transformers, and SDPA's masked path scores all T x T pairs.
  `packed_attention` runs one unmasked causal SDPA per packed example instead, or on a CUDA GPU one varlen
  flash-attention call over all of them (`cu_seqlens` found once a batch).

The forward values of the first two are the numbers transformers computes, op for op. `patched_for_training(model)`
swaps them in for the length of a `with` block, on modules that pass a numerical probe against their own forward
(so a model whose norm or MLP differs, e.g. Gemma's (1 + weight) norm, keeps its own code). The attention is
switched on per packed batch with `packed_attention_on`, after `packed_attention_supported` probed the model.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.quant.linear import QuantLinear


class RMSNormFunction(torch.autograd.Function):
    """weight * (x / sqrt(mean(x^2) + eps)), computed in fp32 and cast back, as LlamaRMSNorm. Saves x and 1/rms."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_normed = (grad * weight).float()
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed))
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * normed.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up. Saves gate and up; silu is recomputed in backward (aten's own silu_backward kernel)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x)))


def _candidates(module: nn.Module):
    """The replacement forward this module might take, judged by its shape only; the probe decides."""
    if isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon") \
            and module.weight.dim() == 1 and type(module).__name__.endswith("RMSNorm"):
        return _rms_norm_forward
    if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and \
            isinstance(getattr(module, "act_fn", None), _silu_types()):
        return _swiglu_mlp_forward
    return None


def _silu_types() -> tuple[type, ...]:
    try:
        from transformers.activations import SiLUActivation  # transformers' own SiLU class, where it has one
    except ImportError:
        return (nn.SiLU,)
    return (nn.SiLU, SiLUActivation)


@torch.no_grad()
def _same_function(module: nn.Module, forward, width: int) -> bool:
    """Does `forward` give the module's own output on a seeded random input? Run in eval mode (no dropout inside)
    and with a private generator, so the probe draws nothing from the global RNG."""
    dtype, device = _compute_dtype_device(module)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 3, width, generator=generator).to(device=device, dtype=dtype)
    with _eval_mode(module):
        return torch.equal(forward(module, x), module(x))


def _compute_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device activations have in `module`: its first floating parameter's, or a packed layer's (an MLP
    of QLoRA layers may hold no parameter at all)."""
    for m in module.modules():
        if isinstance(m, QuantLinear):
            return m.dtype, m.device
        param = next((p for p in m.parameters(recurse=False) if p.is_floating_point()), None)
        if param is not None:
            return param.dtype, param.device
    return torch.get_default_dtype(), torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """eval() for the block (no dropout in a probe); every submodule's own train/eval flag is back after it."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


PACKED_ATTENTION = "loraforge_packed"


@dataclass(frozen=True)
class Segments:
    """The packed examples of a batch, found once a step (not once a layer): their lengths row after row, and for
    the GPU kernel their cumulative starts (N+1,) int32 on the batch's device and the longest length."""
    lengths: list[int]
    cu_seqlens: torch.Tensor
    max_len: int

    @classmethod
    def of(cls, position_ids: torch.Tensor) -> Segments:
        lengths = segment_lengths(position_ids)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=position_ids.device)
        return cls(lengths, cu, max(lengths))


_SEGMENTS: contextvars.ContextVar[Segments | None] = contextvars.ContextVar("loraforge_segments", default=None)


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention over packed rows, each packed example on its own. A transformers attention function: query
    (B, H, T, D), key and value (B, Hkv, T, D); returns (B, T, H, D).

    For packed rows transformers builds a block-diagonal (B, 1, T, T) mask, repeats the key/value heads, and SDPA
    takes its masked path over all T x T scores (a third of a step's time on the default model). Cut where
    `position_ids` restart, each example is a plain causal attention: only sum(L_i^2) scores, no mask, GQA native.
    On a CUDA GPU in bf16/fp16 all examples go to one varlen flash-attention call (`varlen_attention`); elsewhere
    one unmasked SDPA call per example.
    """
    if position_ids is None or attention_mask is not None or query.shape[2] != key.shape[2]:
        raise RuntimeError("packed_attention needs packed rows: position_ids, no attention mask, no cache")
    B, H, T, D = query.shape
    segments = _SEGMENTS.get() or Segments.of(position_ids.expand(B, -1))
    if varlen_applies(query) and not (dropout and module.training):
        q = query.transpose(1, 2).reshape(B * T, H, D)  # every row's examples end to end
        k = key.transpose(1, 2).reshape(B * T, key.shape[1], D)
        v = value.transpose(1, 2).reshape(B * T, value.shape[1], D)
        return varlen_attention(q, k, v, segments, scaling).view(B, T, H, D), None
    q = query.transpose(0, 1).reshape(H, B * T, D)  # every row's examples end to end
    k = key.transpose(0, 1).reshape(key.shape[1], B * T, D)
    v = value.transpose(0, 1).reshape(value.shape[1], B * T, D)
    gqa = k.shape[0] != H
    lengths = segments.lengths
    out = torch.cat([F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scaling,
                                                    enable_gqa=gqa)
                     for qs, ks, vs in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))], dim=1)
    return out.view(H, B, T, D).permute(1, 2, 0, 3), None


def varlen_applies(query: torch.Tensor) -> bool:
    """torch's varlen flash attention runs on CUDA in half precision."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _varlen_kernel() is not None


@functools.cache
def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments,
                     scaling: float | None, kernel=None) -> torch.Tensor:
    """Causal attention of every packed example at once: q (N, H, D), k and v (N, Hkv, D) with the examples end to
    end as `segments` says; returns (N, H, D). `kernel` is torch's `varlen_attn` (a stand-in in CPU tests)."""
    kernel = kernel or _varlen_kernel()
    causal, native_gqa = _varlen_contract(kernel)
    options = dict(causal)
    if k.shape[1] != q.shape[1]:
        if native_gqa:
            options["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    cu = segments.cu_seqlens
    return kernel(q, k, v, cu, cu, segments.max_len, segments.max_len, scale=scaling, **options)


@functools.cache
def _varlen_contract(kernel) -> tuple[tuple[tuple[str, object], ...], bool]:
    """How `kernel` is asked for causal attention (window_size=(-1, 0) since torch 2.11, is_causal=True in 2.10)
    and whether it takes grouped-query heads itself: read once per kernel, not in every layer."""
    params = inspect.signature(kernel).parameters
    causal = (("window_size", (-1, 0)),) if "window_size" in params else (("is_causal", True),)
    return causal, "enable_gqa" in params


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the packed examples in (B, T) position ids, row after row: one starts at each 0 and at each row
    start."""
    flat = position_ids.reshape(-1)
    T = position_ids.shape[-1]
    starts = sorted(set((flat == 0).nonzero().flatten().tolist()) | set(range(0, flat.numel(), T)))
    return [b - a for a, b in zip(starts, [*starts[1:], flat.numel()])]


@torch.no_grad()
def _packed_attention_agrees(model: nn.Module) -> bool:
    """Does the model give the same logits on two packed examples with `packed_attention` as with its own
    attention? (A model that does not hand position_ids to its attention function fails and keeps its own.)"""
    param = next(model.parameters())
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, 9), generator=torch.Generator().manual_seed(0)).to(param.device)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]], device=param.device)
    with _eval_mode(model):
        expected = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
        try:
            with packed_attention_on(model):
                ours = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
        except (RuntimeError, TypeError, ValueError):
            return False
    tol = 1e-4 if param.dtype == torch.float32 else 5e-2
    return bool(((ours - expected).abs().max() <= tol * expected.abs().max().clamp(min=1.0)).item())


def packed_attention_supported(model: nn.Module) -> bool:
    """Can `packed_attention` stand in for this model's attention? Registers it with transformers and probes."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    from transformers import AttentionInterface
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    return _packed_attention_agrees(model)


@contextlib.contextmanager
def packed_attention_on(model: nn.Module, position_ids: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block the model attends per packed example (check `packed_attention_supported` first). Only for
    packed batches: transformers builds no mask for a custom attention, so a padded batch would be read unmasked.
    Given the batch's `position_ids`, its examples are found here once, not in every layer."""
    config = model.config
    original, config._attn_implementation = config._attn_implementation, PACKED_ATTENTION
    token = _SEGMENTS.set(Segments.of(position_ids) if position_ids is not None else None)
    try:
        yield
    finally:
        config._attn_implementation = original
        _SEGMENTS.reset(token)


@contextlib.contextmanager
def patched_for_training(model: nn.Module) -> Iterator[int]:
    """Within the block, RMSNorm and SwiGLU-MLP modules that pass the probe run the lean forwards. Yields how many
    modules were patched; the originals are back on exit."""
    verdicts: dict[tuple[type, object], bool] = {}
    patched: list[nn.Module] = []
    for module in model.modules():
        forward = _candidates(module)
        if forward is None or "forward" in vars(module):
            continue
        width = module.weight.shape[0] if forward is _rms_norm_forward else module.gate_proj.in_features
        key = (type(module), forward)
        if key not in verdicts:  # one probe per module class: same class, same code
            verdicts[key] = _same_function(module, forward, width)
        if verdicts[key]:
            module.forward = types.MethodType(forward, module)
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
