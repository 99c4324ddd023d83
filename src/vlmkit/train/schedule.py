"""Learning-rate schedules: linear warmup then cosine, linear or constant decay; `cosine_floor` (the tower
pretraining's): warmup by progress from 1% of the lr, then cosine to 0."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant", "cosine_floor")
WARMUP_FLOOR = 0.01  # `cosine_floor`: the first step's share of the lr


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int):
    """Multiplier of the base lr at optimizer step s (0-based), for the schedules warmed up over whole steps
    (`cosine_floor` warms up by progress: `build_scheduler` builds it from its ratio)."""
    if schedule not in SCHEDULES or schedule == "cosine_floor":
        known = ", ".join(s for s in SCHEDULES if s != "cosine_floor")
        raise ValueError(f"unknown schedule '{schedule}' for whole warmup steps; known: {known}")

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


def cosine_floor(total_steps: int, warmup_ratio: float):
    """Multiplier at step s: warmup by progress (s / n / warmup_ratio, at least WARMUP_FLOOR), then cosine to 0.
    Unlike `cosine`, the first step takes 1% of the lr however short the run (in a 3-step run, `cosine` has no
    warmup step at all and its first step takes the whole lr)."""

    def factor(step: int) -> float:
        progress = step / max(1, total_steps)
        if progress < warmup_ratio:
            return max(progress / warmup_ratio, WARMUP_FLOOR)
        rest = (progress - warmup_ratio) / max(1e-8, 1 - warmup_ratio)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, rest)))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_ratio: float):
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule '{schedule}'; known: {', '.join(SCHEDULES)}")
    if schedule == "cosine_floor":
        factor = cosine_floor(total_steps, warmup_ratio)
    else:
        factor = lr_lambda(schedule, total_steps, int(round(warmup_ratio * total_steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
