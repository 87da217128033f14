"""Numeric tolerances per dtype: the one place tests get them from (STYLE.md, "Tests assert numbers").

ATOL[dtype] is the largest max-abs difference accepted between two computations that are equal in exact arithmetic
(merged vs unmerged, loraforge vs peft) on the tiny test models, whose logits are O(1).
"""
from __future__ import annotations

import torch

ATOL: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.bfloat16: 5e-2,
    torch.float16: 5e-3,
}

FP32 = ATOL[torch.float32]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| as a Python float, in fp32 (shapes must match exactly)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()
