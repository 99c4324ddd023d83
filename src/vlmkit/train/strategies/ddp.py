"""Multi-process strategies under torchrun: the shared process-group base and DDP (a full replica per rank)."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from vlmkit.log import get_logger
from vlmkit.train.strategies.base import STRATEGIES, SingleProcess

log = get_logger(__name__)


def init_process_group() -> tuple[int, int, torch.device]:
    """Join the torchrun job (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from the environment).

    nccl with device `cuda:LOCAL_RANK` where CUDA is available, gloo on CPU otherwise. An already initialized
    default process group is reused.
    """
    if not dist.is_initialized() and "RANK" not in os.environ:
        raise RuntimeError(
            "train.strategy ddp/fsdp needs a torchrun launch (RANK, WORLD_SIZE, MASTER_ADDR are unset): "
            "torchrun --nproc_per_node G -m vlmkit.cli train ..."
        )
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


class _Distributed(SingleProcess):
    """What DDP and FSDP share: the process group, the main rank, averaging, barriers, teardown."""

    def __init__(self) -> None:
        self.rank, self.world, self.device = init_process_group()
        self.is_main = self.rank == 0

    def mean(self, value: float) -> float:
        """The average of `value` over all ranks."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group (end of training)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def shard(self, items: list[int]) -> list[int]:
        """This rank's contiguous slice of a global batch (as `StageData` takes it)."""
        n = len(items) // self.world
        return items[self.rank * n : (self.rank + 1) * n]

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


@STRATEGIES.register("ddp")
class DDPStrategy(_Distributed):
    """DistributedDataParallel: a full replica per rank, gradients all-reduced (averaged) at each sync step.

    `find_unused_parameters=True`: parts can sit out a forward (a text-only batch skips tower and bridge, tower
    layers after `select_layer` never run). Buffers are not broadcast per forward (no trained buffers; it also
    keeps validation forwards free of collectives).
    """

    def wrap(self, model: nn.Module) -> nn.Module:
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        model.to(self.device)
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        return DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=True,
            **({"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}),
        )

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def no_sync(self, model: nn.Module, sync: bool):
        return nullcontext() if sync else model.no_sync()
