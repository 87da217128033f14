"""One decode step of a Llama-family decoder, written out: the engine's hot loop for one new token per row.

transformers' forward serves every case (training, prefill, masks of all kinds, output dataclasses); a decode step
needs few of them, and on a 2-core CPU their Python costs a fifth of the step. This is the same computation with
the model's own modules (the norms, the rotary embedding, the projections, which carry the LoRA adapters), in
nanoGPT's shape: the embedding, then per layer attention and MLP with residuals, then the head on the last position.

It covers `model_type` llama, mistral and qwen2 (with their default attention): anything else, or a model whose
modules are not where these expect, goes through transformers' forward (`supports` says which). Tested equal to
transformers' logits within the fp32 tolerance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.lora import sgmv
from loraforge.lora.multi import MultiLoraLinear, project_t

LLAMA_FAMILY = ("llama", "mistral", "qwen2")


def supports(model: nn.Module) -> bool:
    """True when `decode_step` computes exactly what `model`'s own forward does."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    return (
        config is not None and config.model_type in LLAMA_FAMILY
        and getattr(config, "hidden_act", None) == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
        and getattr(config, "sliding_window", None) is None
        and config._attn_implementation in ("sdpa", "eager")
        and inner is not None and hasattr(inner, "rotary_emb") and hasattr(model, "lm_head")
        and all(isinstance(getattr(m, name, None), MultiLoraLinear)  # served layers (lora.multi)
                for m, names in ((model, ["lm_head"]), (inner.layers[0].self_attn, ["q_proj", "k_proj", "v_proj",
                                 "o_proj"]), (inner.layers[0].mlp, ["gate_proj", "up_proj", "down_proj"]))
                for name in names)
        and hasattr(inner.norm, "variance_epsilon")
        and getattr(config, "final_logit_softcapping", None) is None
    )


@torch.no_grad()
def decode_step(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache
                ) -> torch.Tensor:
    """Logits (B, V) of one new token per row.

    ids (B, 1) the tokens fed in; positions (B, 1) their position ids; mask (B, T) 1 where a key is a real token,
    T = cached tokens + 1; cache a transformers `DynamicCache` whose layers take the new keys and values.

    Activations are kept transposed, (features, B): every projection is then one W xᵀ on the served layer
    (`MultiLoraLinear.forward_t`, the faster form for few rows here) with no copy back to row-major between them;
    only attention sees (B, heads, 1, head_dim) views.
    """
    inner, config = model.model, model.config
    B = ids.shape[0]
    xt = inner.embed_tokens(ids)[:, 0].T.contiguous()  # (H, B)
    cos, sin = inner.rotary_emb(xt, position_ids=positions)  # (B, 1, hd) each
    fused = sgmv.kernel_for(xt)  # csrc/decode.cpp's RMSNorm and rotary, or None: torch ops
    rope = (cos[:, 0].T.contiguous(), sin[:, 0].T.contiguous()) if fused else (cos.unsqueeze(1), sin.unsqueeze(1))
    bias = torch.zeros(mask.shape, dtype=xt.dtype, device=xt.device).masked_fill_(mask == 0, float("-inf"))
    bias = bias[:, None, None, :]  # (B, 1, 1, T): a row attends to its own real tokens only
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    for i, layer in enumerate(inner.layers[:config.num_hidden_layers]):
        attn, mlp = layer.self_attn, layer.mlp
        ht = _rms_t(layer.input_layernorm, xt, fused)
        q, k, v = project_t((attn.q_proj, attn.k_proj, attn.v_proj), ht)
        q, k = _rotate_t(q, n_heads, B, rope, fused), _rotate_t(k, n_kv, B, rope, fused)  # (B, nh|nkv, 1, hd)
        k, v = cache.layers[i].update(k, _heads(v, n_kv, B))  # (B, nkv, T, hd)
        y = _attend(q, k, v, bias, attn.scaling)  # (B, nkv, g, hd)
        xt = xt + attn.o_proj.forward_t(y.permute(1, 2, 3, 0).reshape(-1, B))  # (H, B)
        ht = _rms_t(layer.post_attention_layernorm, xt, fused)
        gate, up = project_t((mlp.gate_proj, mlp.up_proj), ht)
        xt = xt + mlp.down_proj.forward_t(F.silu(gate) * up)
    return model.lm_head.forward_t(_rms_t(inner.norm, xt, fused)).T.float()  # (B, V)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale + bias) v for one query per row, grouped-query: q (B, nh, 1, hd), k and v (B, nkv, T, hd)
    -> (B, nkv, nh/nkv, hd), heads in q's order. Each kv head serves its group of query heads by a view, never
    repeated in memory as SDPA's math path does (its `enable_gqa` copies K and V every step)."""
    B, nh, _, hd = q.shape
    n_kv = k.shape[1]
    scores = torch.matmul(q.reshape(B, n_kv, nh // n_kv, hd), k.transpose(-1, -2))  # (B, nkv, g, T)
    weights = torch.softmax(torch.add(bias, scores, alpha=scale), dim=-1, dtype=torch.float32)  # as eager: fp32
    return torch.matmul(weights.to(v.dtype), v)


def _rms_t(norm: nn.Module, xt: torch.Tensor, fused) -> torch.Tensor:
    """The model's RMSNorm (Llama's: in fp32, weight after the cast back) over the features of xt (H, B); one C++
    pass where `fused` (the kernels module) is given, an fp32 xt."""
    if fused is not None and norm.weight.dtype == torch.float32:
        return fused.rms_t(xt, norm.weight, norm.variance_epsilon)
    x32 = xt.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(0, keepdim=True) + norm.variance_epsilon)
    return norm.weight[:, None] * x32.to(xt.dtype)


def _heads(yt: torch.Tensor, heads: int, B: int) -> torch.Tensor:
    """(heads·hd, B) -> (B, heads, 1, hd), a view."""
    return yt.view(heads, -1, B).permute(2, 0, 1).unsqueeze(2)


def _rotate_t(yt: torch.Tensor, heads: int, B: int, rope: tuple[torch.Tensor, torch.Tensor], fused) -> torch.Tensor:
    """Rotary embedding of a projection yt (heads·hd, B) as transformers' `apply_rotary_pos_emb` (rotate-half form),
    as (B, heads, 1, hd) views: with `fused`, one C++ pass on yt and rope = cos, sin (hd, B); else torch ops on the
    views and rope = cos, sin (B, 1, 1, hd)."""
    cos, sin = rope
    if fused is not None:
        return _heads(fused.rotary_t(yt, cos, sin), heads, B)
    t = _heads(yt, heads, B)
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rotated * sin
