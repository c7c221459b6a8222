"""Optimizer and LR schedule shared by every mode."""

from __future__ import annotations

import math

import torch

from drpt_ray.config import OptimSpec


def lr_factor(step: int, total: int, spec: OptimSpec) -> float:
    """Multiplier of the peak LR at `step` (0-based): linear warmup, then the chosen decay."""
    warmup = math.ceil(spec.warmup_frac * total)
    if step < warmup:
        return (step + 1) / warmup
    if spec.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if spec.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def make_optimizer(groups: list[dict], spec: OptimSpec, total_steps: int):
    """AdamW over parameter groups (each may carry its own `lr`) and the scheduled LR."""
    opt = torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, spec))
    return opt, sched
