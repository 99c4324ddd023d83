"""Learning-rate schedules: linear warmup then cosine, linear or constant decay."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant")


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int):
    """Multiplier of the base lr at optimizer step s (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule '{schedule}'; known: {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_ratio: float):
    warmup = int(round(warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, total_steps, warmup))
