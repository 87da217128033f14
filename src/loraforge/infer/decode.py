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
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, 1, hd)
    bias = torch.zeros(mask.shape, dtype=xt.dtype, device=xt.device).masked_fill_(mask == 0, float("-inf"))
    bias = bias[:, None, None, :]  # (B, 1, 1, T): a row attends to its own real tokens only
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    for i, layer in enumerate(inner.layers[:config.num_hidden_layers]):
        attn, mlp = layer.self_attn, layer.mlp
        ht = _rms_t(layer.input_layernorm, xt)
        q, k, v = project_t((attn.q_proj, attn.k_proj, attn.v_proj), ht)
        q, k, v = _heads(q, n_heads, B), _heads(k, n_kv, B), _heads(v, n_kv, B)  # (B, nh|nkv, 1, hd)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k, v = cache.layers[i].update(k, v)  # (B, nkv, T, hd)
        y = _attend(q, k, v, bias, attn.scaling)  # (B, nkv, g, hd)
        xt = xt + attn.o_proj.forward_t(y.permute(1, 2, 3, 0).reshape(-1, B))  # (H, B)
        ht = _rms_t(layer.post_attention_layernorm, xt)
        gate, up = project_t((mlp.gate_proj, mlp.up_proj), ht)
        xt = xt + mlp.down_proj.forward_t(F.silu(gate) * up)
    return model.lm_head.forward_t(_rms_t(inner.norm, xt)).T.float()  # (B, V)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale + bias) v for one query per row, grouped-query: q (B, nh, 1, hd), k and v (B, nkv, T, hd)
    -> (B, nkv, nh/nkv, hd), heads in q's order. Each kv head serves its group of query heads by a view, never
    repeated in memory as SDPA's math path does (its `enable_gqa` copies K and V every step)."""
    B, nh, _, hd = q.shape
    n_kv = k.shape[1]
    scores = torch.matmul(q.reshape(B, n_kv, nh // n_kv, hd), k.transpose(-1, -2))  # (B, nkv, g, T)
    weights = torch.softmax(torch.add(bias, scores, alpha=scale), dim=-1, dtype=torch.float32)  # as eager: fp32
    return torch.matmul(weights.to(v.dtype), v)


def _rms_t(norm: nn.Module, xt: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm (Llama's: in fp32, weight after the cast back) over the features of xt (H, B)."""
    x32 = xt.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(0, keepdim=True) + norm.variance_epsilon)
    return norm.weight[:, None] * x32.to(xt.dtype)


def _heads(yt: torch.Tensor, heads: int, B: int) -> torch.Tensor:
    """(heads·hd, B) -> (B, heads, 1, hd), a view."""
    return yt.view(heads, -1, B).permute(2, 0, 1).unsqueeze(2)


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers' `apply_rotary_pos_emb` (rotate-half form); t (B, heads, 1, hd)."""
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rotated * sin
