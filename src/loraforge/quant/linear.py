"""Frozen layers with a packed weight: the quantized base that QLoRA trains LoRA on.

`QuantLinear` stands where an `nn.Linear` stood (`QuantEmbedding` where an input embedding did, `--quantize
nf4-all`). Its weight lives only packed (NF4, NF4 with double quantization, or
a GGUF file's own Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks); the forward dequantizes it, multiplies, and drops it. Backward
dequantizes again for the input's gradient (the base is frozen, so no weight gradient), so a training step never
keeps a dense copy between forward and backward: that is QLoRA's memory saving (`QuantMatmul`). A weight as big as an
output head is multiplied a panel of rows at a time, so its dense form never exists whole either.

Packed tensors are buffers of raw bytes (uint8), fp32 scales included, so `model.to(dtype)` cannot round them;
`dequantize(dtype)` gives the weight in any dtype, computed in fp32 first.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.quant import ggml, nf4

METHODS = ("none", "nf4", "nf4-dq", "gguf", "nf4-all", "nf4-dq-all")
"""`--quantize` values: a dense base; NF4 (blocks of 64, an fp32 absmax each); NF4 with double quantization; the
GGUF file's own blocks (a GGUF base only); nf4 / nf4-dq with the input embedding and the output head packed too
(QLoRA keeps those two dense)."""
CHUNK_WEIGHTS = 1 << 18
"""Weights a panel when a big packed weight is unpacked (1 MiB of fp32 values: a core's L2 cache)."""
PANEL_MATMUL_WEIGHTS = 1 << 24
"""A packed weight with more weights than this is multiplied a panel of rows at a time, its dense form never whole:
an output head (a 1B Llama's 32,000 x 2,048 is 131 MB in bf16). Smaller ones are unpacked whole, one matmul."""
MATMUL_PANEL_WEIGHTS = 1 << 21
"""Weights a panel of such a panel-wise matmul (1,024 rows of a 2,048-wide head)."""


class PackedWeight(nn.Module):
    """A frozen (rows, cols) weight stored packed in `fmt` ("nf4", "nf4-dq" or a `ggml.FORMATS` name): byte buffers
    (fp32 scales included, immune to `model.to(dtype)`), unpacked a panel of rows at a time, computed in fp32."""

    def __init__(self, fmt: str, packed: dict[str, torch.Tensor], rows: int, cols: int, dtype: torch.dtype):
        super().__init__()
        self.fmt, self.rows, self.cols = fmt, rows, cols
        self.dtype = dtype  # the compute dtype: what `dequantize` and the forward give when not told
        self._keys = tuple(packed)
        for key, tensor in packed.items():  # raw bytes: immune to model.to(dtype)
            self.register_buffer(key, tensor.reshape(-1).contiguous().view(torch.uint8) if tensor.dim() else
                                 tensor.reshape(1).view(torch.uint8))
        self._dtypes = {key: tensor.dtype for key, tensor in packed.items()}
        self._shapes = {key: tuple(tensor.shape) for key, tensor in packed.items()}

    def packed(self) -> dict[str, torch.Tensor]:
        """The packed tensors with their own dtypes and shapes (views of the byte buffers)."""
        return {k: getattr(self, k).view(self._dtypes[k]).view(self._shapes[k]) for k in self._keys}

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight (rows, cols) in `dtype`, computed in fp32 (written into `out` when given).

        A big weight is unpacked a panel of rows at a time (`CHUNK_WEIGHTS`) into the `dtype` result, so the fp32
        values and the index tensors in between stay the size of a panel: a 5632 x 2048 bf16 weight costs its own
        23 MB, not 115 MB of transients as well. Each value is the same element-wise computation either way. NF4
        through the C++ kernel (`nf4.unpack_kernel`) makes no transients and goes in one call."""
        one_pass = self.fmt in ("nf4", "nf4-dq") and nf4.unpack_kernel(self.device) is not None
        if one_pass or out is None and self._panel_rows() >= self.rows:  # the C++ kernel: no transients
            return self._dequantize_rows(self.packed(), 0, self.rows, dtype, out)
        out = torch.empty(self.rows, self.cols, dtype=dtype, device=self.device) if out is None else out
        for start, stop, panel in self.panels(torch.float32):
            out[start:stop] = panel
        return out

    def panels(self, dtype: torch.dtype, weights: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, rows start..stop of the dense weight in `dtype`), about `weights` weights a panel (default
        `CHUNK_WEIGHTS`)."""
        packed, rows = self.packed(), self._panel_rows(weights)
        if "qabsmax" in packed and rows < self.rows:  # undo double quantization once, not once a panel
            packed = {"qweight": packed["qweight"], "absmax": nf4.absmax_of(packed)}
        for start in range(0, self.rows, rows):
            stop = min(start + rows, self.rows)
            yield start, stop, self._dequantize_rows(packed, start, stop, dtype)

    def _panel_rows(self, weights: int | None = None) -> int:
        """Rows a panel of about `weights` weights (default `CHUNK_WEIGHTS`): whole NF4 blocks and whole bytes (else
        the whole weight at once)."""
        if self.fmt in ("nf4", "nf4-dq") and self.cols % nf4.BLOCK:
            return self.rows
        return max(1, (CHUNK_WEIGHTS if weights is None else weights) // self.cols)

    def _dequantize_rows(self, packed: dict[str, torch.Tensor], start: int, stop: int, dtype: torch.dtype,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start..stop of the dense weight, in `dtype` (computed in fp32), from `packed` (`packed()`'s); written
        into `out` when given."""
        shape = (stop - start, self.cols)
        if self.fmt in ("nf4", "nf4-dq"):
            return nf4.dequantize(packed, shape, dtype, offset=start * self.cols, out=out)
        rows = ggml.dequantize(packed["blocks"][start:stop], self.fmt, shape, dtype)
        return rows if out is None else out.copy_(rows)

    @property
    def device(self) -> torch.device:
        return getattr(self, self._keys[0]).device

    @property
    def num_weights(self) -> int:
        """The weight's parameter count (rows · cols), which its packed buffers do not show."""
        return self.rows * self.cols

    @property
    def weight_bytes(self) -> int:
        return sum(getattr(self, k).numel() for k in self._keys)

    def _bits(self) -> str:
        return f"fmt={self.fmt}, {8 * self.weight_bytes / self.num_weights:.3f} bits/weight"


class QuantLinear(PackedWeight):
    """y = x Wᵀ + b with W (out, in) stored packed, frozen."""

    def __init__(self, fmt: str, packed: dict[str, torch.Tensor], in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(fmt, packed, out_features, in_features, dtype)
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str) -> QuantLinear:
        """Quantize a dense `nn.Linear` with NF4 ("nf4" or "nf4-dq")."""
        if method not in ("nf4", "nf4-dq"):
            raise ValueError(f"from_linear quantizes to nf4 or nf4-dq, not {method!r}")
        packed = nf4.quantize(linear.weight, double=method == "nf4-dq")
        return cls(method, packed, linear.in_features, linear.out_features, linear.bias, linear.weight.dtype)

    def to_dense(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """A frozen `nn.Linear` in this layer's place: `weight` (out, in), default this layer's own dequantized, in the
        compute dtype; the same bias and train/eval mode."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.device,
                          dtype=self.dtype).requires_grad_(False)
        dense.weight.data = (self.dequantize(self.dtype) if weight is None else weight).to(self.dtype)
        if self.bias is not None:
            dense.bias = self.bias
        return dense.train(self.training)

    def linear_by_panels(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x Wᵀ (+ bias) a panel of outputs at a time (`MATMUL_PANEL_WEIGHTS`), W unpacked in x's dtype and never
        whole; the result in `out_dtype` (default x's)."""
        y = x.new_empty(*x.shape[:-1], self.out_features, dtype=out_dtype or x.dtype)
        for start, stop, w in self.panels(x.dtype, MATMUL_PANEL_WEIGHTS):
            y[..., start:stop] = F.linear(x, w, None if bias is None else bias[start:stop])
        return y

    def times_by_panels(self, grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """grad W, (..., out) @ (out, in), a panel of W's rows at a time, unpacked in `dtype` (grad cast to it a panel
        at a time), the panels summed in fp32 so that a bf16 weight's do not round at each sum; the result in
        `dtype`."""
        total = grad.new_zeros(*grad.shape[:-1], self.in_features, dtype=torch.float32)
        for start, stop, w in self.panels(dtype, MATMUL_PANEL_WEIGHTS):
            total += grad[..., start:stop].to(dtype) @ w
        return total.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = QuantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self._bits()}"


class QuantEmbedding(PackedWeight):
    """An input embedding (num_embeddings, embedding_dim) stored packed as NF4, frozen: a lookup unpacks only the
    rows it reads. Each row is whole NF4 blocks (embedding_dim a multiple of 64), so a row's bytes and absmaxes are
    a row of the packed tensors; its values are `dequantize()`'s rows, bit for bit."""

    def __init__(self, fmt: str, packed: dict[str, torch.Tensor], num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype = torch.float32, padding_idx: int | None = None):
        if fmt not in ("nf4", "nf4-dq") or embedding_dim % nf4.BLOCK:
            raise ValueError(f"a packed embedding is NF4 with rows of whole {nf4.BLOCK}-weight blocks, not {fmt} "
                             f"with embedding_dim {embedding_dim}")
        super().__init__(fmt, packed, num_embeddings, embedding_dim, dtype)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, method: str) -> QuantEmbedding:
        """Quantize a dense `nn.Embedding` with NF4 ("nf4" or "nf4-dq")."""
        packed = nf4.quantize(embedding.weight, double=method == "nf4-dq")
        return cls(method, packed, embedding.num_embeddings, embedding.embedding_dim, embedding.weight.dtype,
                   embedding.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        packed, flat = self.packed(), ids.reshape(-1)
        codes = packed["qweight"].view(self.rows, self.cols // 2).index_select(0, flat)  # (n, cols / 2) bytes
        absmax = nf4.absmax_of(packed).view(self.rows, -1).index_select(0, flat)  # (n, cols / 64)
        rows = nf4.dequantize({"qweight": codes.reshape(-1), "absmax": absmax.reshape(-1)}, (flat.numel(), self.cols),
                              self.dtype)
        return rows.view(*ids.shape, self.cols)

    def to_dense(self) -> nn.Embedding:
        """A frozen `nn.Embedding` of the dequantized weight, in the compute dtype."""
        dense = nn.Embedding(self.rows, self.cols, padding_idx=self.padding_idx, device=self.device, dtype=self.dtype)
        dense.weight.data = self.dequantize(self.dtype)
        return dense.requires_grad_(False).train(self.training)

    def extra_repr(self) -> str:
        return f"{self.rows}, {self.cols}, {self._bits()}"


_scratch = threading.local()


def _scratch_weight(layer: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, cols) `dtype` buffer for `QuantMatmul`'s dequantized weight, one per thread, device and dtype, grown
    to the biggest weight and reused: a model's 23 MB weights unpacked afresh at each layer, forward and backward,
    left glibc's heap fragmented (a 1B model's peak RSS grew by 0.3-2 GB over two steps where each call allocated
    its own); one buffer does not. The weight is used within the call that unpacked it and never escapes it."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    key, need = (layer.device, dtype), layer.rows * layer.cols
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < need:
        buffers[key] = buffer = None  # the old one goes first
        buffers[key] = buffer = torch.empty(need, dtype=dtype, device=layer.device)
    return buffer[:need].view(layer.rows, layer.cols)


class QuantMatmul(torch.autograd.Function):
    """x Wᵀ for a packed W: forward and backward each dequantize it into the thread's reused buffer
    (`_scratch_weight`) and multiply at once. Saves nothing but the layer. A weight above `PANEL_MATMUL_WEIGHTS` goes
    a panel of rows (outputs) at a time, in both directions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        if layer.num_weights <= PANEL_MATMUL_WEIGHTS:
            return F.linear(x, layer.dequantize(x.dtype, _scratch_weight(layer, x.dtype)))
        return layer.linear_by_panels(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        layer = ctx.layer
        if layer.num_weights <= PANEL_MATMUL_WEIGHTS:
            weight = layer.dequantize(grad.dtype, _scratch_weight(layer, grad.dtype))
            return grad @ weight, None  # (..., out) @ (out, in)
        return layer.times_by_panels(grad, grad.dtype), None


def base_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The one accessor for a base layer's weight, packed or not: dense, in the module's own layout (Conv1D's is
    (in, out)), in `dtype` (default: the module's own, or for a packed one its compute dtype)."""
    if isinstance(module, QuantLinear):
        return module.dequantize(dtype or module.dtype)
    return module.weight if dtype is None else module.weight.to(dtype)


def weight_count(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of a model's weights, each tied weight once, packed weights at their real size (a packed
    head tied to a packed embedding shares its bytes, counted once)."""
    seen: dict[int, torch.Tensor] = {id(p): p for p in model.parameters()}
    params = sum(p.numel() for p in seen.values())
    size = sum(p.numel() * p.element_size() for p in seen.values())
    packed_seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, PackedWeight):
            key = getattr(module, module._keys[0]).data_ptr()
            if key not in packed_seen:
                packed_seen.add(key)
                params += module.num_weights
                size += module.weight_bytes
    return params, size
