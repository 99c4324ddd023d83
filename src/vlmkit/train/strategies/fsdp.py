"""FSDP2 under torchrun: `fully_shard` per transformer block of the tower and the LLM, the rest in the root unit."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from vlmkit.log import get_logger
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.stages import has_lora
from vlmkit.train.strategies.base import STRATEGIES
from vlmkit.train.strategies.ddp import _Distributed

log = get_logger(__name__)


@STRATEGIES.register("fsdp")
class FSDPStrategy(_Distributed):
    """FSDP2: parameters sharded per transformer block of the tower and of the LLM, the rest in the root unit.

    Frozen and trainable parameters may share a unit (FSDP2 shards per parameter; only those with gradients
    are reduce-scattered), so LoRA adapters next to frozen base weights work. 0-dim parameters (cross-attention
    gates), which FSDP2 cannot shard, are held as shape [1] while wrapped. Parameters keep their storage dtype;
    `train.precision` autocast decides the compute dtype, as for the other strategies. Checkpoints hold full
    (unsharded) trainable weights and a full optimizer state in the single-process format.
    """

    shards_parameters = True

    def __init__(self) -> None:
        super().__init__()
        self._lifted: set[str] = set()  # 0-dim parameters held as [1] while wrapped

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        _broadcast_states(model, self._comm_device())  # every rank shards the same (rank 0's) weights
        self._lifted = _lift_scalars(model)
        mesh = init_device_mesh(self.device.type, (self.world,))
        blocks = tuple(dict.fromkeys((*model.vision.block_cls, *model.llm.block_cls)))
        units = [m for m in model.modules() if isinstance(m, blocks)]
        if not units:
            log.warning("fsdp: no %s blocks found; the model is sharded as one unit", blocks)
        for module in units:
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # ranks may run different parts (a text-only micro-batch skips the tower): reduce zeros for those
        model.set_reduce_scatter_unused_params(True)
        log.info("fsdp: %d block units + root over %d ranks", len(units), self.world)
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        """A plain (unsharded) copy of `model` on CPU with the full weights, on every rank (a collective)."""
        if not isinstance(model, _fsdp_module_type()):
            return model
        with torch.random.fork_rng(devices=[]):  # building must not move the training RNG
            plain = VisionLanguageModel.from_config(model.portable_config(), tokenizer=model.tokenizer)
            if has_lora(model):
                from peft import get_peft_model

                adapters = model.llm.model.peft_config
                if list(adapters) != ["default"]:
                    raise RuntimeError(
                        f"fsdp: only the 'default' LoRA adapter is supported, got {list(adapters)}"
                    )
                plain.llm.model = get_peft_model(plain.llm.model, copy.deepcopy(adapters["default"]))
        target = plain.state_dict()
        source = model.state_dict()
        if set(target) != set(source):
            diff = sorted(set(target) ^ set(source))
            raise RuntimeError(f"fsdp: the rebuilt model does not match the trained one: {diff[:5]}")
        with torch.no_grad():
            for name, tensor in source.items():  # same order on every rank: full_tensor() is a collective
                target[name].copy_(_full(tensor).reshape(target[name].shape))
        for name, param in model.named_parameters():
            plain.get_parameter(name).requires_grad_(param.requires_grad)
        return plain.train(model.training)

    def no_sync(self, model: nn.Module, sync: bool):
        return _gradient_sync(model, sync)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global gradient norm over the sharded gradients; clip to `max_norm` when it is > 0."""
        params = [p for p in model.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # partial per-shard norms -> the global norm
        if max_norm and max_norm > 0 and params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def gather_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
        """Full trainable weights and full optimizer state on rank 0 (None elsewhere); a collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        weights: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    full = _full(param.detach())
                    if self.is_main:
                        weights[name] = (
                            full.cpu().reshape(() if name in self._lifted else full.shape).contiguous()
                        )
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        by_name = get_optimizer_state_dict(model, optimizer, options=options)
        if not self.is_main:
            return None, None
        for name in self._lifted & set(by_name["state"]):
            by_name["state"][name] = _reshape_moments(by_name["state"][name], ())
        return weights, _indexed(by_name, _param_names(model, optimizer))

    def load_optimizer(
        self, optimizer: torch.optim.Optimizer, state: dict[str, Any], model: nn.Module
    ) -> None:
        """Load a full optimizer state (single-process format, as `gather_state` writes it) into the shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        by_name = _by_name(state, _param_names(model, optimizer))
        for name in self._lifted & set(by_name["state"]):
            by_name["state"][name] = _reshape_moments(by_name["state"][name], (1,))
        set_optimizer_state_dict(
            model, optimizer, by_name, options=StateDictOptions(full_state_dict=True, strict=True)
        )


# ------------------------------------------------------------------------------------------- helpers
def _fsdp_module_type() -> type:
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


@contextmanager
def _gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """FSDP2's `no_sync`: accumulation micro-steps keep unsharded gradients and skip the reduce-scatter."""
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The unsharded tensor (all-gathered from the ranks for a DTensor)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _broadcast_states(model: nn.Module, device: torch.device) -> None:
    """Copy rank 0's parameters and buffers to every rank (what DDP does at construction)."""
    seen: set[int] = set()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            moved = tensor.detach().to(device)
            dist.broadcast(moved, src=0)
            if moved.data_ptr() != tensor.data_ptr():
                tensor.copy_(moved)


def _lift_scalars(model: nn.Module) -> set[str]:
    """Give every 0-dim parameter the shape [1] (same values; the forward broadcasts it alike); their names."""
    lifted = set()
    for name, param in list(model.named_parameters()):
        if param.ndim == 0:
            owner, _, attr = name.rpartition(".")
            lifted_param = nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad)
            setattr(model.get_submodule(owner), attr, lifted_param)
            lifted.add(name)
    return lifted


def _reshape_moments(state: dict[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    """A lifted parameter's optimizer state with its per-element tensors (not `step`) in `shape`."""
    return {k: v.reshape(shape) if torch.is_tensor(v) and k != "step" else v for k, v in state.items()}


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in `optimizer.state_dict()` index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _indexed(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Name-keyed optimizer state (torch.distributed.checkpoint) -> the index-keyed `Optimizer.state_dict()`."""
    index = {n: i for i, n in enumerate(names)}
    return {
        "state": {index[n]: s for n, s in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def _by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of `_indexed`."""
    return {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
