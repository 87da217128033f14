"""Frozen linear layers with a packed weight: the quantized base that QLoRA trains LoRA on.

`QuantLinear` stands where an `nn.Linear` stood. Its weight lives only packed (NF4, NF4 with double quantization, or
a GGUF file's own Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks); the forward dequantizes it, multiplies, and drops it. Backward
dequantizes again for the input's gradient (the base is frozen, so no weight gradient), so a training step never
keeps a dense copy between forward and backward: that is QLoRA's memory saving (`QuantMatmul`).

Packed tensors are buffers of raw bytes (uint8), fp32 scales included, so `model.to(dtype)` cannot round them;
`dequantize(dtype)` gives the weight in any dtype, computed in fp32 first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.quant import ggml, nf4

METHODS = ("none", "nf4", "nf4-dq", "gguf")
"""`--quantize` values: a dense base; NF4 (blocks of 64, an fp32 absmax each); NF4 with double quantization; the
GGUF file's own blocks (a GGUF base only)."""
CHUNK_WEIGHTS = 1 << 18
"""Weights a panel when a big packed weight is unpacked (1 MiB of fp32 values: a core's L2 cache)."""


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W stored packed in `fmt` ("nf4", "nf4-dq" or a `ggml.FORMATS` name), frozen."""

    def __init__(self, fmt: str, packed: dict[str, torch.Tensor], in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        self.dtype = dtype  # the compute dtype: what `base_weight` dequantizes to when not told
        self._keys = tuple(packed)
        for key, tensor in packed.items():  # raw bytes: immune to model.to(dtype)
            self.register_buffer(key, tensor.reshape(-1).contiguous().view(torch.uint8) if tensor.dim() else
                                 tensor.reshape(1).view(torch.uint8))
        self._dtypes = {key: tensor.dtype for key, tensor in packed.items()}
        self._shapes = {key: tuple(tensor.shape) for key, tensor in packed.items()}
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str) -> QuantLinear:
        """Quantize a dense `nn.Linear` with NF4 ("nf4" or "nf4-dq")."""
        if method not in ("nf4", "nf4-dq"):
            raise ValueError(f"from_linear quantizes to nf4 or nf4-dq, not {method!r}")
        packed = nf4.quantize(linear.weight, double=method == "nf4-dq")
        return cls(method, packed, linear.in_features, linear.out_features, linear.bias, linear.weight.dtype)

    def packed(self) -> dict[str, torch.Tensor]:
        """The packed tensors with their own dtypes and shapes (views of the byte buffers)."""
        return {k: getattr(self, k).view(self._dtypes[k]).view(self._shapes[k]) for k in self._keys}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight (out, in) in `dtype`, computed in fp32.

        A big weight is unpacked a panel of rows at a time (`CHUNK_WEIGHTS`) into the `dtype` result, so the fp32
        values and the index tensors in between stay the size of a panel: a 5632 x 2048 bf16 weight costs its own
        23 MB, not 115 MB of transients as well. Each value is the same element-wise computation either way."""
        packed, rows = self.packed(), self._panel_rows()
        if rows >= self.out_features:
            return self._dequantize_rows(packed, 0, self.out_features, dtype)
        if "qabsmax" in packed:  # undo double quantization once, not once a panel
            packed = {"qweight": packed["qweight"], "absmax": nf4.absmax_of(packed)}
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.device)
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            out[start:stop] = self._dequantize_rows(packed, start, stop, torch.float32)
        return out

    def _panel_rows(self) -> int:
        """Rows a panel: whole NF4 blocks and whole bytes (else the whole weight at once)."""
        rows = max(1, CHUNK_WEIGHTS // self.in_features)
        if self.fmt in ("nf4", "nf4-dq") and self.in_features % nf4.BLOCK:
            return self.out_features
        return rows

    def _dequantize_rows(self, packed: dict[str, torch.Tensor], start: int, stop: int, dtype: torch.dtype
                         ) -> torch.Tensor:
        """Rows start..stop of the dense weight, in `dtype` (computed in fp32), from `packed` (`packed()`'s)."""
        shape = (stop - start, self.in_features)
        if self.fmt in ("nf4", "nf4-dq"):
            return nf4.dequantize(packed, shape, dtype, offset=start * self.in_features)
        return ggml.dequantize(packed["blocks"][start:stop], self.fmt, shape, dtype)

    def to_dense(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """A frozen `nn.Linear` in this layer's place: `weight` (out, in), default this layer's own dequantized, in the
        compute dtype; the same bias and train/eval mode."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.device,
                          dtype=self.dtype).requires_grad_(False)
        dense.weight.data = (self.dequantize(self.dtype) if weight is None else weight).to(self.dtype)
        if self.bias is not None:
            dense.bias = self.bias
        return dense.train(self.training)

    @property
    def device(self) -> torch.device:
        return getattr(self, self._keys[0]).device

    @property
    def num_weights(self) -> int:
        """The weight's parameter count (out · in), which its packed buffers do not show."""
        return self.in_features * self.out_features

    @property
    def weight_bytes(self) -> int:
        return sum(getattr(self, k).numel() for k in self._keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = QuantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        bits = 8 * self.weight_bytes / self.num_weights
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, {bits:.3f} bits/weight"


class QuantMatmul(torch.autograd.Function):
    """x Wᵀ for a packed W: forward and backward each dequantize it and let it go. Saves nothing but the layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantize(grad.dtype), None  # (..., out) @ (out, in)


def base_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The one accessor for a base layer's weight, packed or not: dense, in the module's own layout (Conv1D's is
    (in, out)), in `dtype` (default: the module's own, or for a packed one its compute dtype)."""
    if isinstance(module, QuantLinear):
        return module.dequantize(dtype or module.dtype)
    return module.weight if dtype is None else module.weight.to(dtype)


def weight_count(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of a model's weights, each tied weight once, packed layers at their real size."""
    seen: dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    params = sum(p.numel() for p in seen.values())
    size = sum(p.numel() * p.element_size() for p in seen.values())
    for module in model.modules():
        if isinstance(module, QuantLinear):
            params += module.num_weights
            size += module.weight_bytes
    return params, size
