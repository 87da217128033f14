"""The LoRA layers against the closed form, at hand-picked integer values.

Every expected tensor is written out as literals; the comments show the arithmetic that produced it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraforge.lora import LoraEmbedding, LoraLinear
from loraforge.lora.layer import DroppedLowRank, dropout_keep
from tolerances import FP32, max_abs_diff

# Shared integer values: W (out=2, in=3), b (2,), A (r=2, in=3), B (out=2, r=2), x (2 rows, in=3).
W = [[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]
BIAS = [1.0, -1.0]
A = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
B = [[1.0, 2.0], [0.0, -1.0]]
X = [[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]]
# x0 = (1,2,3): W x0 + b = (5,-1) + (1,-1) = (6,-2);  A x0 = (4,2);  B A x0 = (4+4, -2) = (8,-2)
# x1 = (0,-1,2): W x1 + b = (-2,-3) + (1,-1) = (-1,-4); A x1 = (2,-1); B A x1 = (2-2, 1) = (0,1)
# r=2, lora_alpha=4: scaling 2  ->  y0 = (6,-2) + 2·(8,-2) = (22,-6);  y1 = (-1,-4) + 2·(0,1) = (-1,-2)
EXPECTED_R2_ALPHA4 = [[22.0, -6.0], [-1.0, -2.0]]


def _set(param: torch.Tensor, values: list) -> None:
    with torch.no_grad():
        param.copy_(torch.tensor(values))


def _linear_with(values_w: list, values_b: list | None) -> nn.Linear:
    out_f, in_f = len(values_w), len(values_w[0])
    base = nn.Linear(in_f, out_f, bias=values_b is not None)
    _set(base.weight, values_w)
    if values_b is not None:
        _set(base.bias, values_b)
    return base


def test_linear_closed_form():
    layer = LoraLinear(_linear_with(W, BIAS), r=2, lora_alpha=4)
    _set(layer.lora_A.weight, A)
    _set(layer.lora_B.weight, B)
    assert layer.scaling == 2.0
    y = layer(torch.tensor(X))
    assert torch.equal(y, torch.tensor(EXPECTED_R2_ALPHA4))


def test_linear_closed_form_3d_input():
    # (B, T, in) in, (B, T, out) out: same numbers per position
    layer = LoraLinear(_linear_with(W, BIAS), r=2, lora_alpha=4)
    _set(layer.lora_A.weight, A)
    _set(layer.lora_B.weight, B)
    y = layer(torch.tensor([X, X[::-1]]))
    assert torch.equal(y, torch.tensor([EXPECTED_R2_ALPHA4, EXPECTED_R2_ALPHA4[::-1]]))


def test_linear_merged_weight_closed_form():
    layer = LoraLinear(_linear_with(W, BIAS), r=2, lora_alpha=4)
    _set(layer.lora_A.weight, A)
    _set(layer.lora_B.weight, B)
    # B A = [[1,2],[0,-1]] @ [[1,0,1],[0,1,0]] = [[1,2,1],[0,-1,0]];  W + 2·B A = [[3,6,2],[0,-1,-1]]
    assert torch.equal(layer.merged_weight(), torch.tensor([[3.0, 6.0, 2.0], [0.0, -1.0, -1.0]]))
    layer.merge()
    assert torch.equal(layer(torch.tensor(X)), torch.tensor(EXPECTED_R2_ALPHA4))


def test_rslora_closed_form():
    # r=4, lora_alpha=4: rsLoRA scaling 4/sqrt(4) = 2 (plain LoRA would be 4/4 = 1)
    layer = LoraLinear(_linear_with(W, BIAS), r=4, lora_alpha=4, use_rslora=True)
    assert layer.scaling == 2.0
    assert LoraLinear(_linear_with(W, BIAS), r=4, lora_alpha=4).scaling == 1.0
    _set(layer.lora_A.weight, [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    _set(layer.lora_B.weight, [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, -1.0, 0.0]])
    # x0 = (1,2,3): A x0 = (4,2,3,3);  B A x0 = (4+3, 2-3) = (7,-1);  y0 = (6,-2) + 2·(7,-1) = (20,-4)
    y = layer(torch.tensor([X[0]]))
    assert torch.equal(y, torch.tensor([[20.0, -4.0]]))


def test_rslora_scaling_irrational():
    layer = LoraLinear(_linear_with(W, BIAS), r=2, lora_alpha=4, use_rslora=True)
    assert math.isclose(layer.scaling, 2.8284271247461903, rel_tol=1e-15)  # 4 / sqrt(2)


def test_conv1d_closed_form():
    # GPT-2's Conv1D stores its weight as (in, out) = W^T; the LoRA shapes stay A (r, in), B (out, r)
    base = Conv1D(nf=2, nx=3)
    _set(base.weight, [[1.0, 0.0], [2.0, 1.0], [0.0, -1.0]])  # W^T
    _set(base.bias, BIAS)
    layer = LoraLinear(base, r=2, lora_alpha=4)
    assert layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (3, 2)
    assert tuple(layer.lora_A.weight.shape) == (2, 3) and tuple(layer.lora_B.weight.shape) == (2, 2)
    _set(layer.lora_A.weight, A)
    _set(layer.lora_B.weight, B)
    assert torch.equal(layer(torch.tensor(X)), torch.tensor(EXPECTED_R2_ALPHA4))
    # the merged weight is laid out like the base: (W + 2·B A)^T
    assert torch.equal(layer.merged_weight(), torch.tensor([[3.0, 0.0], [6.0, -1.0], [2.0, -1.0]]))
    layer.merge()
    assert torch.equal(layer(torch.tensor(X)), torch.tensor(EXPECTED_R2_ALPHA4))


def test_embedding_closed_form():
    base = nn.Embedding(4, 2)
    _set(base.weight, [[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [1.0, 1.0]])  # E (num=4, dim=2)
    layer = LoraEmbedding(base, r=2, lora_alpha=4)
    assert tuple(layer.lora_embedding_A.shape) == (2, 4)  # (r, num)
    assert tuple(layer.lora_embedding_B.shape) == (2, 2)  # (dim, r)
    _set(layer.lora_embedding_A, [[1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 1.0, 0.0]])
    _set(layer.lora_embedding_B, [[1.0, 1.0], [0.0, 2.0]])
    # B A = [[1,1,1,2],[0,2,2,0]];  ΔE = 2·(B A)^T = [[2,0],[2,4],[2,4],[4,0]]
    # ids (0,2,3): E + ΔE rows = (1+2, 0+0), (2+2, -1+4), (1+4, 1+0) = (3,0), (4,3), (5,1)
    expected = torch.tensor([[[3.0, 0.0], [4.0, 3.0], [5.0, 1.0]]])
    assert torch.equal(layer(torch.tensor([[0, 2, 3]])), expected)
    assert torch.equal(layer.delta_weight(), torch.tensor([[2.0, 0.0], [2.0, 4.0], [2.0, 4.0], [4.0, 0.0]]))
    layer.merge()
    assert torch.equal(layer(torch.tensor([[0, 2, 3]])), expected)


def _dora_layer() -> LoraLinear:
    # W = [[3,0],[0,1]], b = (1,1), r=1, alpha=1 (scaling 1), A = [[0,1]], B = [[4],[0]]
    layer = LoraLinear(_linear_with([[3.0, 0.0], [0.0, 1.0]], [1.0, 1.0]), r=1, lora_alpha=1, use_dora=True)
    # B = 0 at init, so the magnitude starts as the row norms of W: (3, 1)
    assert torch.equal(layer.lora_magnitude_vector.data, torch.tensor([3.0, 1.0]))
    _set(layer.lora_A.weight, [[0.0, 1.0]])
    _set(layer.lora_B.weight, [[4.0], [0.0]])
    _set(layer.lora_magnitude_vector, [10.0, 3.0])
    return layer


# ΔW = B A = [[0,4],[0,0]];  W + ΔW = [[3,4],[0,1]], row norms (5, 1)
# W' = m / norm · (W + ΔW) = [[10/5·3, 10/5·4], [3/1·0, 3/1·1]] = [[6,8],[0,3]]
# x0 = (1,1): W' x0 + b = (14,3) + (1,1) = (15,4);  x1 = (2,-1): (12-8, -3) + (1,1) = (5,-2)
DORA_X = [[1.0, 1.0], [2.0, -1.0]]
DORA_EXPECTED = [[15.0, 4.0], [5.0, -2.0]]


def test_dora_linear_closed_form():
    layer = _dora_layer()
    assert torch.equal(layer(torch.tensor(DORA_X)), torch.tensor(DORA_EXPECTED))


def test_dora_linear_merge_closed_form():
    layer = _dora_layer()
    assert torch.equal(layer.merged_weight(), torch.tensor([[6.0, 8.0], [0.0, 3.0]]))
    layer.merge()
    assert torch.equal(layer.base_layer.weight.data, torch.tensor([[6.0, 8.0], [0.0, 3.0]]))
    assert torch.equal(layer(torch.tensor(DORA_X)), torch.tensor(DORA_EXPECTED))
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight.data, torch.tensor([[3.0, 0.0], [0.0, 1.0]]))


def test_dora_train_mode_with_dropout_path_matches_closed_form():
    # with dropout p>0 in train mode DoRA recomputes the base output as F.linear(dropout(x), W); dropout is
    # replaced by identity here so the numbers stay pinned
    layer = LoraLinear(_linear_with([[3.0, 0.0], [0.0, 1.0]], [1.0, 1.0]), r=1, lora_alpha=1, use_dora=True,
                       lora_dropout=0.5)
    _set(layer.lora_A.weight, [[0.0, 1.0]])
    _set(layer.lora_B.weight, [[4.0], [0.0]])
    _set(layer.lora_magnitude_vector, [10.0, 3.0])
    layer.lora_dropout = nn.Dropout(0.0)
    layer.train()
    assert torch.equal(layer(torch.tensor(DORA_X)), torch.tensor(DORA_EXPECTED))


def test_dropout_no_effect_in_eval_and_effect_in_train():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 8), r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False)
    reference = LoraLinear(nn.Linear(32, 8), r=4, lora_alpha=8, lora_dropout=0.0)
    reference.load_state_dict(layer.state_dict())
    assert isinstance(reference.lora_dropout, nn.Identity)
    x = torch.randn(4, 32)
    layer.eval()
    reference.eval()
    assert torch.equal(layer(x), reference(x))
    layer.train()
    torch.manual_seed(1)
    train_out = layer(x)
    diff = max_abs_diff(train_out, reference(x))
    assert diff > 1e-2, diff
    # the dropout is on the LoRA branch only: the base output is untouched
    with torch.no_grad():
        layer.lora_B.weight.zero_()
    assert torch.equal(layer(x), layer.base_layer(x))


def test_dropped_low_rank_matches_autograd_on_the_same_mask():
    # the fused branch (bool mask kept, rescale folded into A) == autograd through x * keep * scale
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1234)
    keep, scale = dropout_keep(x, 0.3)
    reference = ((x * keep * scale) @ a.T @ b.T)
    grad = torch.randn_like(reference)
    ref_grads = torch.autograd.grad(reference, (x, a, b), grad)
    torch.manual_seed(1234)  # the same mask
    fused = DroppedLowRank.apply(x, a, b, 0.3)
    fused_grads = torch.autograd.grad(fused, (x, a, b), grad)
    assert max_abs_diff(fused, reference) < 1e-12
    for ours, ref in zip(fused_grads, ref_grads):
        assert max_abs_diff(ours, ref) < 1e-12

    def seeded(x, a, b):
        torch.manual_seed(99)
        return DroppedLowRank.apply(x, a, b, 0.3)
    assert torch.autograd.gradcheck(seeded, (x, a, b))


def test_dropped_low_rank_in_bf16_is_the_where_formulation_bit_for_bit():
    """The mask multiplies x as 0/1 bytes; the values are torch.where(keep, x, 0)'s (dropped elements become +-0)."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 64).to(torch.bfloat16).requires_grad_()
    a = (torch.randn(4, 64) * 0.1).to(torch.bfloat16).requires_grad_()
    b = torch.randn(16, 4).to(torch.bfloat16).requires_grad_()
    torch.manual_seed(5)
    keep, scale = dropout_keep(x, 0.3)
    a_scaled = a.detach() * scale
    h = F.linear(torch.where(keep, x.detach(), 0), a_scaled)
    torch.manual_seed(5)
    out = DroppedLowRank.apply(x, a, b, 0.3)
    assert torch.equal(out, F.linear(h, b.detach()))
    grad = torch.randn_like(out)
    gx, ga, gb = torch.autograd.grad(out, (x, a, b), grad)
    grad_h = grad @ b.detach()
    assert torch.equal(gx, torch.where(keep, grad_h @ a_scaled, 0))
    assert torch.equal(ga, (grad_h.flatten(0, -2).T @ torch.where(keep, x.detach(), 0).flatten(0, -2)) * scale)
    assert torch.equal(gb, grad.flatten(0, -2).T @ h.flatten(0, -2))


def test_dropout_keep_rate_and_rescale():
    x = torch.empty(1000, 1000)
    torch.manual_seed(7)
    keep, scale = dropout_keep(x, 0.05)
    # cut = round(0.05 * 32768) = 1638: P(drop) = 1638 / 32768 = 0.049987..., rescale 32768 / 31130
    assert scale == 32768 / 31130
    dropped = 1 - keep.float().mean().item()
    assert abs(dropped - 1638 / 32768) < 5 * math.sqrt(0.05 * 0.95 / 1e6), dropped  # 5 sigma
    torch.manual_seed(7)
    assert torch.equal(keep, dropout_keep(x, 0.05)[0])  # the global seed fixes the mask
    assert not torch.equal(keep, dropout_keep(x, 0.05)[0])
    torch.manual_seed(1)
    odd = dropout_keep(torch.empty(3, 7), 0.5)[0]  # odd element count: shape kept
    assert odd.shape == (3, 7) and 0 < odd.sum() < 21


def test_train_mode_dropout_is_seeded_and_unbiased():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 4), r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False).train()
    x = torch.randn(2, 16)
    torch.manual_seed(5)
    first = layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), first)  # the global seed fixes the masks
    # averaged over many masks the branch is the undropped one (E[keep * scale] = 1)
    mean = torch.stack([layer(x).detach() for _ in range(4000)]).mean(0)  # grad on: the fused branch
    layer.eval()
    assert max_abs_diff(mean, layer(x)) < 0.1 * layer(x).abs().max().item()


# ---- init ---------------------------------------------------------------------------------------------------------
def test_default_init_linear_is_identity():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    for init in (True, "gaussian"):
        layer = LoraLinear(base, r=4, lora_alpha=8, init_lora_weights=init)
        assert torch.equal(layer.lora_B.weight, torch.zeros(8, 4))
        assert layer.lora_A.weight.abs().sum() > 0
        assert torch.equal(layer(x), base(x))


def test_default_init_embedding_is_identity():
    torch.manual_seed(0)
    base = nn.Embedding(10, 6)
    ids = torch.tensor([[0, 3, 9, 3]])
    for init in (True, "gaussian"):
        layer = LoraEmbedding(base, r=4, lora_alpha=8, init_lora_weights=init)
        assert torch.equal(layer.lora_embedding_A, torch.zeros(4, 10))
        assert layer.lora_embedding_B.abs().sum() > 0
        assert torch.equal(layer(ids), base(ids))


def test_default_init_dora_is_identity():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    layer = LoraLinear(base, r=4, lora_alpha=8, use_dora=True)
    assert max_abs_diff(layer(x), base(x)) <= FP32
    assert torch.allclose(layer.lora_magnitude_vector, torch.linalg.norm(base.weight, dim=1))


def test_gaussian_init_std():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(1024, 16), r=8, lora_alpha=16, init_lora_weights="gaussian")
    std = layer.lora_A.weight.std().item()  # 8 x 1024 samples: relative error of the std ~ 1/sqrt(2·8192) ~ 0.8%
    assert abs(std - 1 / 8) < 0.125 * 0.05, std
    assert abs(layer.lora_A.weight.mean().item()) < 0.01


def test_default_init_a_is_kaiming_uniform():
    # kaiming_uniform(a=sqrt(5)) on (r, in) is U(-1/sqrt(in), 1/sqrt(in)), like nn.Linear's own init
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(1024, 16), r=8, lora_alpha=16)
    bound = 1 / math.sqrt(1024)
    assert layer.lora_A.weight.abs().max().item() <= bound
    assert layer.lora_A.weight.abs().max().item() > 0.99 * bound


def test_init_false_is_not_identity():
    torch.manual_seed(0)
    base_lin, base_emb = nn.Linear(16, 8), nn.Embedding(10, 6)
    x, ids = torch.randn(3, 16), torch.tensor([[0, 3, 9]])
    lin = LoraLinear(base_lin, r=4, lora_alpha=8, init_lora_weights=False)
    emb = LoraEmbedding(base_emb, r=4, lora_alpha=8, init_lora_weights=False)
    assert max_abs_diff(lin(x), base_lin(x)) > 1e-2
    assert max_abs_diff(emb(ids), base_emb(ids)) > 1e-2
