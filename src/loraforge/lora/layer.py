"""The LoRA layers: each wraps one frozen base module and adds a trainable low-rank update.

    y = base(x) + scaling · B(A(dropout(x))),   scaling = lora_alpha / r   (or lora_alpha / sqrt(r), rsLoRA)

Parameter names, shapes and initialisation are PEFT's (peft/tuners/lora/layer.py), so a state dict is an adapter
file up to a key prefix. One adapter per layer: many-adapter serving is a different class.

The base may be packed (`quant.QuantLinear`: QLoRA): every read of the base weight goes through one accessor,
`base_weight` (dense, in the base's layout), and the wrapper for a base module is chosen by its type (`LAYER_FOR`),
as PEFT dispatches per base-layer type. Merging onto a packed base adds the update to the *dequantized* weight (the
function that was trained) and puts a dense `nn.Linear` in its place; unmerge puts the packed layer back.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraforge.errors import LoraforgeError
from loraforge.quant.linear import QuantLinear, base_weight


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class _LoraBase(nn.Module):
    """What the Linear and Embedding wrappers share: scaling, the disabled flag, exact merge/unmerge."""

    is_lora_wrapper = True

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, use_rslora: bool, use_dora: bool):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.use_dora = use_dora
        self.disabled = False  # set by LoraModel.disable_adapter(); the base output alone
        self._unmerged_weight: torch.Tensor | None = None  # the exact base weight while merged
        self._unmerged_base: nn.Module | None = None  # a packed base layer while merged (a dense one stands in)

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None or self._unmerged_base is not None

    def forget_unmerged(self) -> None:
        """Keep the merged weight for good (merge_and_unload): the original is dropped."""
        self._unmerged_weight = self._unmerged_base = None

    def delta_weight(self) -> torch.Tensor:
        """scaling · B·A in fp32, laid out like the base weight."""
        raise NotImplementedError

    def _weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as (out, in): the orientation DoRA's per-output norm is taken over."""
        return weight

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The base weight with the update folded in, computed in fp32 (DoRA included)."""
        new = base_weight(self.base_layer, torch.float32) + self.delta_weight()
        if self.use_dora:
            # PEFT's DoRA merge: W' = m / ||W + ΔW||_row · (W + ΔW)
            rows = self._weight_rows(new)  # (out, in)
            factor = (self.lora_magnitude_vector.float() / torch.linalg.norm(rows, dim=1)).unsqueeze(1)
            new = self._weight_rows(factor * rows)  # back to the base layout (a transpose is its own inverse)
        return new

    @torch.no_grad()
    def merge(self, name: str = "") -> None:
        """Fold the update into the base weight. Idempotent; the original is kept so unmerge() is exact."""
        if self.merged:
            return
        new = self.merged_weight()
        if not torch.isfinite(new).all():
            raise LoraforgeError(f"merging LoRA into {name or type(self.base_layer).__name__} gives NaN/inf weights; "
                                 "the adapter is broken (check the training loss) and nothing was written")
        if isinstance(self.base_layer, QuantLinear):  # the dequantized base + the update, dense (not re-quantized)
            self._unmerged_base = self.base_layer
            self.base_layer = self.base_layer.to_dense(new)
            return
        weight = self.base_layer.weight
        self._unmerged_weight = weight.data
        weight.data = new.to(weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight. Idempotent."""
        if not self.merged:
            return
        if self._unmerged_base is not None:
            self.base_layer, self._unmerged_base = self._unmerged_base, None
            return
        self.base_layer.weight.data = self._unmerged_weight
        self._unmerged_weight = None

    def lora_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, dora={self.use_dora}"


class LoraLinear(_LoraBase):
    """LoRA around `nn.Linear` (weight (out, in)), transformers' GPT-2 `Conv1D` (weight (in, out)) or a packed
    `QuantLinear` (out, in)."""

    def __init__(self, base_layer: nn.Linear | Conv1D | QuantLinear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, init_lora_weights: bool | str = True):
        super().__init__(base_layer, r, lora_alpha, use_rslora, use_dora)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = in_features, out_features = linear_features(base_layer)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False)   # (r, in)
        self.lora_B = nn.Linear(r, out_features, bias=False)  # (out, r)
        self.pissa_start: tuple[torch.Tensor, torch.Tensor] | None = None  # (A0, B0) of a PiSSA start
        if init_lora_weights == PISSA:
            self._pissa_init()
        else:
            _init_a_b(self.lora_A.weight, self.lora_B.weight, r, init_lora_weights)
        if use_dora:
            # The magnitude starts as the row norms of W + ΔW, so DoRA starts equal to the base (ΔW = 0 at init).
            with torch.no_grad():
                norm = torch.linalg.norm(self._weight_rows(base_weight(base_layer, torch.float32)
                                                           + self.delta_weight()), dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm)  # (out,)

    def _weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    @torch.no_grad()
    def _pissa_init(self) -> None:
        """PiSSA (Meng et al. 2024), PEFT's `init_lora_weights="pissa"`: with W = U S Vᵀ, A and B start as the top-r
        singular directions, B = U_r sqrt(S_r/s), A = sqrt(S_r/s) V_rᵀ (so s·B A is W's best rank-r part), and the
        frozen base keeps the rest, W − s·B A: the layer computes exactly W at step 0, and training moves the
        principal part instead of a zero start. A0 and B0 are kept (`pissa_start`) so the trained adapter can be
        saved as an ordinary one on the original W (`LoraModel.saved_form`)."""
        base = self.base_layer
        if isinstance(base, QuantLinear):
            raise LoraforgeError("init_lora_weights pissa moves the frozen base to W minus its top-r part, which a "
                                 "packed (4-bit) base cannot hold; with quantize, use lora_init loftq")
        if self.use_dora:
            raise LoraforgeError("init_lora_weights pissa does not go with DoRA (use_dora): choose one")
        dtype = base.weight.dtype
        weight = self._weight_rows(base.weight.float())  # (out, in)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        sr = s[:self.r] / self.scaling
        a = torch.diag(torch.sqrt(sr)) @ vh[:self.r]  # (r, in)
        b = u[:, :self.r] @ torch.diag(torch.sqrt(sr))  # (out, r)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)
        base.weight.data = self._weight_rows(weight - self.scaling * b @ a).to(dtype).contiguous()
        self.pissa_start = (a.clone(), b.clone())

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def lora_parameters(self) -> list[nn.Parameter]:
        extra = [self.lora_magnitude_vector] if self.use_dora else []
        return [self.lora_A.weight, self.lora_B.weight, *extra]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (B, T, out)
        if self.disabled or self.merged:
            return result
        if not self.use_dora:
            # In the activations' dtype, like autocast: the fp32 A and B are cast (r x in, out x r: cheap), the
            # (B, T, in) activations never are, and the scaling is folded into B instead of a pass over (B, T, out).
            a = self.lora_A.weight.to(x.dtype)  # (r, in)
            b = (self.lora_B.weight * self.scaling).to(x.dtype)  # (out, r)
            p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
            if p > 0 and self.training and torch.is_grad_enabled():
                return result + DroppedLowRank.apply(x, a, b, p).to(result.dtype)
            return result + F.linear(F.linear(self.lora_dropout(x), a), b).to(result.dtype)
        x = x.to(self.lora_A.weight.dtype)
        return result + self._dora_extra(x, result).to(result.dtype)

    def _dora_extra(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # PEFT's DoraLinearLayer.forward; the norm is detached (DoRA paper, section 4.3).
        weight = self._weight_rows(base_weight(self.base_layer, x.dtype))  # (out, in)
        lora_weight = self.lora_B.weight @ self.lora_A.weight  # (out, r) @ (r, in)
        weight_norm = torch.linalg.norm(weight + self.scaling * lora_weight.detach(), dim=1).detach()  # (out,)
        mag_norm_scale = (self.lora_magnitude_vector / weight_norm).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result = result.to(x.dtype)
            if self.base_layer.bias is not None:
                base_result = base_result - self.base_layer.bias.to(x.dtype)
        else:
            x = self.lora_dropout(x)
            base_result = F.linear(x, weight)
        lora_result = self.lora_B(self.lora_A(x))
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling


def dropout_keep(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A keep-mask (bool, x's shape) and the 1 / P(keep) rescale. Seeded by torch's global generator, so seeded runs
    repeat and a resumed run (which restores that generator) draws the same masks.

    Each element gets 15 random bits and is dropped with probability round(p * 32768) / 32768, within 1.6e-5 of p;
    the rescale uses that exact probability, so E[dropout(x)] = x as with nn.Dropout. On CPU the bits come from
    numpy's PCG64 (one 64-bit draw per 4 elements, ~3.5x faster than torch's mt19937 `random_`, which is ~10x
    faster than nn.Dropout's float-per-element bernoulli draw); elsewhere from torch's generator.
    """
    n, cut = x.numel(), round(p * 32768)
    if x.device.type == "cpu":
        seed = int(torch.randint(0, 2**62, ()))
        bits = torch.from_numpy(np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.int16)[:n])
    else:
        bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_().view(torch.int16)[:n]
    keep = (bits.view(x.shape) & 0x7FFF) >= cut
    return keep, 32768 / (32768 - cut)


class DroppedLowRank(torch.autograd.Function):
    """dropout(x) @ a.T @ b.T, keeping for backward x (usually kept already) and a bool mask instead of nn.Dropout's
    mask and dropped copy in x's dtype: 1 byte per element instead of 4 in bf16. The rescale is folded into a
    (r x in) rather than applied to (..., in).

    Shapes: x (..., in), a (r, in), b (out, r), all one dtype. Returns (..., out).

    The mask is applied as a multiplication by its bytes (0/1 as uint8): the same values as `torch.where(keep, x, 0)`
    up to the sign of a dropped zero, and on CPU 3x faster in bf16 (torch's bool paths are not vectorized there:
    72 against 203 us for 8 x 128 x 576).
    """

    @staticmethod
    def forward(ctx, x, a, b, p):
        keep, scale = dropout_keep(x, p)
        a_scaled = a * scale
        h = F.linear(x * keep.view(torch.uint8), a_scaled)  # (..., r)
        ctx.save_for_backward(x, keep, a_scaled, b, h)
        ctx.scale = scale
        return F.linear(h, b)

    @staticmethod
    def backward(ctx, grad):
        x, keep, a_scaled, b, h = ctx.saved_tensors
        ones = keep.view(torch.uint8)
        grad_h = grad @ b  # (..., r)
        grad_b = grad.flatten(0, -2).T @ h.flatten(0, -2)  # (out, r)
        grad_a = (grad_h.flatten(0, -2).T @ (x * ones).flatten(0, -2)) * ctx.scale  # (r, in)
        grad_x = (grad_h @ a_scaled).mul_(ones) if ctx.needs_input_grad[0] else None
        return grad_x, grad_a, grad_b, None


class LoraEmbedding(_LoraBase):
    """LoRA around `nn.Embedding`: A is (r, num_embeddings), B is (embedding_dim, r), as in PEFT."""

    def __init__(self, base_layer: nn.Embedding, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, init_lora_weights: bool | str = True):
        super().__init__(base_layer, r, lora_alpha, use_rslora, use_dora)
        num, dim = base_layer.weight.shape
        # PEFT applies no dropout to embedding LoRA; the field is accepted and has no effect, as there.
        self.lora_embedding_A = nn.Parameter(torch.empty(r, num))
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, r))
        if init_lora_weights == PISSA:
            raise LoraforgeError("init_lora_weights pissa starts Linear and Conv1D layers; an embedding target takes "
                                 "the default start (leave it out of target_modules, or use init true)")
        if init_lora_weights is False:
            nn.init.normal_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
        else:  # loralib and PEFT: A zero, B normal, so the update starts at zero
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
        if use_dora:
            with torch.no_grad():
                norm = torch.linalg.norm(self._weight_rows(base_layer.weight.float() + self.delta_weight()), dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm)  # (dim,)

    def _weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T  # the embedding's "outputs" are its dim columns: (dim, num)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling  # (num, dim)

    def lora_parameters(self) -> list[nn.Parameter]:
        extra = [self.lora_magnitude_vector] if self.use_dora else []
        return [self.lora_embedding_A, self.lora_embedding_B, *extra]

    def _embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(ids)  # (B, T, dim)
        if self.disabled or self.merged:
            return result
        update = self._embed(ids, self.lora_embedding_A.T) @ self.lora_embedding_B.T * self.scaling  # (B, T, dim)
        embed_scale = getattr(self.base_layer, "embed_scale", None)  # e.g. Gemma scales inside its embedding
        scale = 1.0 if embed_scale is None else embed_scale.to(update.dtype)
        if not self.use_dora:
            return result + (update * scale).to(result.dtype)
        lora_weight = (self.lora_embedding_A.T @ self.lora_embedding_B.T).T  # (dim, num)
        weight_norm = torch.linalg.norm(self.base_layer.weight.T + self.scaling * lora_weight.detach(), dim=1)
        mag_norm_scale = self.lora_magnitude_vector / weight_norm.detach()  # (dim,)
        return (mag_norm_scale * result + mag_norm_scale * update * scale).to(result.dtype)


PISSA = "pissa"
"""`init_lora_weights` value of a PiSSA start (`LoraLinear._pissa_init`)."""


def _init_a_b(a: torch.Tensor, b: torch.Tensor, r: int, init: bool | str) -> None:
    with torch.no_grad():
        if init is False:  # both random: a non-trivial adapter from the start (tests, debugging)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            return
        if init is True:  # microsoft/LoRA loralib/layers.py: A like nn.Linear's default, B zero
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:  # "gaussian"
            nn.init.normal_(a, std=1 / r)
        nn.init.zeros_(b)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear base layer: `nn.Linear`, `QuantLinear`, or `Conv1D` (whose weight is (in, out))."""
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


LAYER_FOR: dict[type, type[_LoraBase]] = {
    nn.Linear: LoraLinear, Conv1D: LoraLinear, QuantLinear: LoraLinear, nn.Embedding: LoraEmbedding,
}
"""The LoRA wrapper for each base-layer type (a subclass gets its nearest base class's wrapper)."""
WRAPPABLE = tuple(LAYER_FOR)


def layer_class(module: nn.Module) -> type[_LoraBase] | None:
    return next((LAYER_FOR[c] for c in type(module).__mro__ if c in LAYER_FOR), None)


def wrap(module: nn.Module, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool, use_dora: bool,
         init_lora_weights: bool | str) -> _LoraBase:
    """The LoRA wrapper for one base module (the caller checks `isinstance(module, WRAPPABLE)` first)."""
    layer = layer_class(module)(module, r, lora_alpha, lora_dropout, use_rslora, use_dora, init_lora_weights)
    device = module.device if isinstance(module, QuantLinear) else module.weight.device
    return layer.to(device)
