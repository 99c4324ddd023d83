"""The strategy contract and the single-process strategy; the STRATEGIES registry (rank/world from the environment)."""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from vlmkit.registry import Registry

STRATEGIES: Registry = Registry("strategy")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


@STRATEGIES.register("single")
class SingleProcess:
    """One process, one device (CUDA if available, else CPU)."""

    world = 1
    rank = 0
    is_main = True
    shards_parameters = False  # FSDP: parameters are sharded DTensors of one dtype per unit

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wrap(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def no_sync(self, model: nn.Module, sync: bool):
        return nullcontext()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm and max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return (
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            if params
            else torch.zeros(())
        )

    def mean(self, value: float) -> float:
        return float(value)

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        """End of training (multi-process strategies destroy their process group)."""

    def gather_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
        """(trainable weights, optimizer state) as full tensors; None means 'take them from the objects'."""
        return None, None

    def load_optimizer(
        self, optimizer: torch.optim.Optimizer, state: dict[str, Any], model: nn.Module
    ) -> None:
        optimizer.load_state_dict(state)

    def shard(self, items: list[int]) -> list[int]:
        """This rank's slice of a global batch."""
        return items
