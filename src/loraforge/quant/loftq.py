"""LoftQ (Li et al. 2024): start LoRA where the quantized base plus the adapter is closest to the dense weight.

    Q_1 = quant(W);  s·B_t A_t = SVD_r(W − Q_t);  Q_{t+1} = quant(W − s·B_t A_t)          (alternating, T steps)

so that Q_T + s·B_T A_T ≈ W better than Q_1 = quant(W) alone: the adapter starts by undoing the part of the
quantization error a rank-r update can hold, instead of at zero. Here it runs on the CPU in fp32 (PEFT's LoftQ
hard-codes a CUDA/XPU device). With T = 1 the base is the plain quant(W), the very base every `--quantize` load gives,
so the adapter is an ordinary adapter on it; T > 1 moves the base itself (`Q_T`), which loraforge does not yet save
beside the adapter, so training takes T = 1 (`TrainConfig.lora_init`).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from loraforge.errors import LoraforgeError
from loraforge.quant import nf4
from loraforge.quant.linear import QuantLinear

log = logging.getLogger("loraforge")


def loftq(weight: torch.Tensor, method: str, r: int, scaling: float, iters: int = 1
          ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, float]:
    """(packed Q_T, A (r, in), B (out, r), ratio) for a dense weight (out, in): s·B A = the best rank-r fit of
    W − Q_T, and ratio = ‖W − (Q_T + s·B A)‖ / ‖W − quant(W)‖ (below 1: the start is closer to W than plain QLoRA)."""
    w = weight.detach().float()
    target = w
    for _ in range(iters):
        packed = nf4.quantize(target, double=method == "nf4-dq")
        q = nf4.dequantize(packed, tuple(w.shape))
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        root = s[:r].sqrt()
        left, right = u[:, :r] * root, root[:, None] * vh[:r]  # left @ right: the rank-r fit
        target = w - left @ right
    plain = (w - nf4.dequantize(nf4.quantize(w, double=method == "nf4-dq"), tuple(w.shape))).norm()
    ratio = float((w - q - left @ right).norm() / plain)
    return packed, right.contiguous(), (left / scaling).contiguous(), ratio


@torch.no_grad()
def apply_loftq(lora_model, method: str, iters: int = 1) -> dict[str, float]:
    """LoftQ-initialize every LoRA layer of `lora_model` (a `LoraModel` on a dense base) and pack its base as Q_T, in
    place; {layer path: ratio}, logged. Layers must wrap dense `nn.Linear`s."""
    if method not in ("nf4", "nf4-dq"):
        raise LoraforgeError(f"lora_init loftq needs quantize nf4 or nf4-dq (it fits the NF4 error), not {method!r}")
    ratios: dict[str, float] = {}
    for path, layer in lora_model.layers.items():
        base = layer.base_layer
        if type(base) is not nn.Linear or layer.use_dora:
            raise LoraforgeError(f"lora_init loftq: {path} is a {type(base).__name__}"
                                 f"{' with DoRA' if layer.use_dora else ''}; LoftQ initializes LoRA on nn.Linear")
        packed, a, b, ratios[path] = loftq(base.weight, method, layer.r, layer.scaling, iters)
        layer.base_layer = QuantLinear(method, packed, base.in_features, base.out_features, base.bias,
                                       base.weight.dtype).to(base.weight.device).train(base.training)
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
    values = list(ratios.values())
    log.info("LoftQ (%d iteration%s): ||W - (Q + sBA)|| / ||W - Q|| mean %.4f, worst %.4f over %d layers", iters,
             "" if iters == 1 else "s", sum(values) / len(values), max(values), len(values))
    return ratios
