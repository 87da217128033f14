"""Learning-rate schedules and optimizer parameter groups (LoRA+)."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from loraforge.lora import LoraLinear, LoraModel

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the schedule.

    Warmup step s of w runs at (s+1)/(w+1) of the peak, so no step is wasted at lr 0. Cosine and linear decay reach
    zero at `total`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {SCHEDULES}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0
    return factor


def param_groups(lm: LoraModel, lr: float, weight_decay: float, loraplus_lr_ratio: float | None) -> list[dict]:
    """AdamW groups. With LoRA+ (Hayou et al. 2024) the B matrices learn `loraplus_lr_ratio` times faster than A."""
    params = list(lm.adapter_parameters().values())
    if not loraplus_lr_ratio:
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]
    fast_ids = {id(layer.lora_B.weight if isinstance(layer, LoraLinear) else layer.lora_embedding_B)
                for layer in lm.layers.values()}
    fast = [p for p in params if id(p) in fast_ids]
    slow = [p for p in params if id(p) not in fast_ids]
    return [{"params": slow, "lr": lr, "weight_decay": weight_decay},
            {"params": fast, "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay}]


def make_optimizer(lm: LoraModel, *, lr: float, weight_decay: float,
                   loraplus_lr_ratio: float | None, schedule: str, warmup: int, total: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(lm, lr, weight_decay, loraplus_lr_ratio)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, warmup, total))
    return optimizer, scheduler
