"""LoftQ (Li et al. 2024): start LoRA where the quantized base plus the adapter is closest to the dense weight.

    Q_1 = quant(W);  s·B_t A_t = SVD_r(W − Q_t);  Q_{t+1} = quant(W − s·B_t A_t)          (alternating, T steps)

so that Q_T + s·B_T A_T ≈ W better than Q_1 = quant(W) alone: the adapter starts by undoing the part of the
quantization error a rank-r update can hold, instead of at zero. Here it runs on the CPU in fp32 (PEFT's LoftQ
hard-codes a CUDA/XPU device). With T = 1 the base is the plain quant(W), the very base every `--quantize` load gives,
so the adapter is an ordinary adapter on it. T > 1 (`TrainConfig.loftq_iter`) moves the base itself to Q_T: training
saves Q_T's packed bytes beside the adapter (`loftq_base.safetensors`, `save_moved_base`), and every load of the
adapter (`generate`/`eval`/`serve` sessions, `merge`) puts them back (`apply_moved_base`), so the adapter always runs
on the base it was trained on. A moved base is the base of every row, so such an adapter is served alone.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
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


MOVED_BASE = "loftq_base.safetensors"
"""Beside an adapter trained with LoftQ T > 1: the packed Q_T of every layer it adapts."""


def save_moved_base(lora_model, directory: str | Path, method: str, iters: int) -> Path:
    """Write the packed base of every LoRA layer of `lora_model` (Q_T) into `directory`/loftq_base.safetensors."""
    from loraforge.lora.adapter import atomic_write  # noqa: PLC0415 (lora imports quant)

    tensors = {f"{path}.{key}": t.detach().cpu().contiguous() for path, layer in lora_model.layers.items()
               for key, t in layer.base_layer.packed().items()}
    metadata = {"format": "loraforge-loftq-base/1", "method": method, "iters": str(iters)}
    out = Path(directory) / MOVED_BASE
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return out


def has_moved_base(adapter: str | Path) -> bool:
    return (Path(adapter) / MOVED_BASE).is_file()


@torch.no_grad()
def apply_moved_base(model: nn.Module, adapter: str | Path) -> bool:
    """Put the LoftQ base `adapter` was trained on (its loftq_base.safetensors) into `model`'s packed layers, which
    must be packed the same way (load the model with the adapter's `--quantize`). False when it has none."""
    path = Path(adapter) / MOVED_BASE
    if not path.is_file():
        return False
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as err:
        raise LoraforgeError(f"{path} cannot be read ({err}): the adapter's LoftQ base is damaged; retrain it") from None
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, name = key.rsplit(".", 1)
        layers.setdefault(layer, {})[name] = tensor
    for layer, packed in layers.items():
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            raise LoraforgeError(f"{path}: this model has no layer {layer}; the adapter was made for another base") \
                from None
        holder = module if hasattr(module, "base_layer") else None
        base = module.base_layer if holder is not None else module
        if not isinstance(base, QuantLinear) or base.fmt != meta.get("method") or set(packed) != set(base.packed()):
            raise LoraforgeError(f"{path}: {layer} must be packed as {meta.get('method')} to take the adapter's LoftQ "
                                 f"base (it is {getattr(base, 'fmt', type(base).__name__)}); load with --quantize "
                                 f"{meta.get('method')}")
        new = QuantLinear(base.fmt, packed, base.in_features, base.out_features, base.bias, base.dtype)
        new = new.to(base.device).train(base.training)
        if holder is not None:
            holder.base_layer = new
        else:
            parent, _, child = layer.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    log.info("LoftQ base of %s (%s, %s iterations) put back into %d layers", adapter, meta.get("method"),
             meta.get("iters"), len(layers))
    return True
