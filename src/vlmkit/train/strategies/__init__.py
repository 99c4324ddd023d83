"""Execution strategies behind one contract (`SingleProcess` defines it): single process, DDP and FSDP2 under
torchrun. Each registers itself in STRATEGIES; `build_strategy` picks one by name."""

from __future__ import annotations

from typing import Any

from vlmkit.train.strategies import ddp, fsdp  # noqa: F401  (register the multi-process strategies)
from vlmkit.train.strategies.base import STRATEGIES, SingleProcess, rank, world_size

__all__ = ["STRATEGIES", "SingleProcess", "build_strategy", "rank", "world_size"]


def build_strategy(name: str = "auto") -> Any:
    """`auto`: DDP under torchrun with more than one process, else single process."""
    if name == "auto":
        name = "ddp" if world_size() > 1 else "single"
    return STRATEGIES.get(name)()
