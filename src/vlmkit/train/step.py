"""One optimizer step, and what makes it fast: the attention kernel, frozen weights kept in bf16, compiled
decoder layers, the AdamW implementation (measurements: docs/training.md, "Where a step's time goes")."""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from vlmkit.config import TrainConfig
from vlmkit.data.collate import Batch
from vlmkit.faults import kill_point
from vlmkit.log import get_logger
from vlmkit.precision import frozen_params, resolve_precision, to_bf16

log = get_logger(__name__)

ATTENTION = ("auto", "sdpa", "eager")
FROZEN_BF16 = ("none", "linear", "all")


def attention_for(setting: str, device: torch.device) -> str:
    """The LLM's attention kernel for training: `auto` is eager attention on CPU (PyTorch's CPU SDPA kernel
    runs its bf16 backward 3-7x slower than the plain matmul-softmax-matmul at 40-512 tokens) and SDPA on GPUs."""
    if setting not in ATTENTION:
        raise ValueError(f"train.attention '{setting}' is not one of {', '.join(ATTENTION)}")
    if setting != "auto":
        return setting
    return "eager" if device.type == "cpu" else "sdpa"


@dataclass
class StepSpeedup:
    """What `speed_up` changed on a model; `undo()` restores it (before the model is merged and saved)."""

    model: Any
    attention: tuple[str, str] | None = None  # (before, during training)
    bf16: list[tuple[nn.Parameter, torch.dtype]] = field(default_factory=list)
    compiled: list[nn.Module] = field(default_factory=list)
    uncast: list[nn.Module] = field(default_factory=list)  # LoRA layers that no longer cast their input
    spill: Path | None = None  # the bf16-stored weights' original values (raw bytes), in a temporary file

    def describe(self) -> str:
        parts = []
        if self.attention:
            parts.append(f"attention {self.attention[1]}")
        if self.bf16:
            n = sum(p.numel() for p, _ in self.bf16)
            parts.append(f"{n / 1e6:.1f}M frozen weights stored in bf16")
        if self.uncast:
            parts.append(f"{len(self.uncast)} LoRA layers take autocast's dtype")
        if self.compiled:
            parts.append(f"{len(self.compiled)} compiled decoder layers")
        return ", ".join(parts) or "no changes"

    def restore_dtypes(self) -> None:
        for param, dtype in self.bf16:
            param.data = param.data.to(dtype)

    def recast(self) -> None:
        for param, _ in self.bf16:
            param.data = param.data.to(torch.bfloat16)

    @contextmanager
    def full_precision(self) -> Iterator[None]:
        """The frozen weights in their own dtype again for a while (e.g. generation outside autocast)."""
        self.restore_dtypes()
        try:
            yield
        finally:
            self.recast()

    def keep_originals(self) -> None:
        """Write the original values of the parameters about to be stored in bf16 to a temporary file (not a
        second copy in memory), for `undo` to put back exactly. Raw bytes read back with `readinto` into fresh
        tensors: a memory-mapped format would count the whole file in the process's resident size while it is
        read, at the stage end, where memory peaks."""
        if not self.bf16:
            return
        handle, name = tempfile.mkstemp(prefix="vlmkit-frozen-", suffix=".bin")
        self.spill = Path(name)
        weakref.finalize(self, self.spill.unlink, True)  # gone at exit even if the stage fails
        with os.fdopen(handle, "wb") as f:
            for param, _ in self.bf16:
                f.write(param.data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def discard(self) -> None:
        """Remove the originals' temporary file (the stage ended without `undo`, e.g. with an error)."""
        if self.spill is not None:
            self.spill.unlink(missing_ok=True)
            self.spill = None

    def undo(self) -> None:
        """Restore the frozen weights' original values and dtypes (not bf16-rounded ones: a saved model keeps
        its base weights as loaded), the attention kernel, and plain (uncompiled) layers."""
        if self.spill is not None:
            with open(self.spill, "rb", buffering=0) as f:
                for param, dtype in self.bf16:
                    original = torch.empty(param.shape, dtype=dtype)
                    if f.readinto(original.reshape(-1).view(torch.uint8).numpy().data) != original.nbytes:
                        raise RuntimeError(f"the frozen weights' originals in {self.spill} are cut short")
                    param.data = original.to(param.device)
            self.discard()
        self.bf16 = []
        if self.attention:
            self.model.llm.set_attention(self.attention[0])
            self.attention = None
        for layer in self.uncast:
            layer.cast_input_dtype_enabled = True
        self.uncast = []
        for layer in self.compiled:
            layer._compiled_call_impl = None  # nn.Module.compile's handle: back to the eager forward
        self.compiled = []


def speed_up(model: Any, cfg: TrainConfig, device: torch.device, sharded: bool = False) -> StepSpeedup:
    """Prepare a model whose stage is applied (requires_grad set) for fast training steps, per `cfg`:
    `attention`, `frozen_bf16` (under bf16 autocast; not when `sharded` (FSDP), whose units need one dtype)
    and `compile` (torch.compile of each LLM decoder layer)."""
    if cfg.frozen_bf16 not in FROZEN_BF16:
        raise ValueError(f"train.frozen_bf16 '{cfg.frozen_bf16}' is not one of {', '.join(FROZEN_BF16)}")
    done = StepSpeedup(model)
    before = model.llm.attention
    wanted = attention_for(cfg.attention, device)
    if wanted != before:
        model.llm.set_attention(wanted)
        done.attention = (before, model.llm.attention)
    bf16_autocast = resolve_precision(cfg.precision, device.type) == "bf16"
    if cfg.frozen_bf16 != "none" and bf16_autocast and not sharded:
        linear = cfg.frozen_bf16 == "linear"  # an LM head tied to the embeddings stays with them (fp32)
        skip = {id(model.llm.embeddings.weight)} if linear else set()
        done.bf16 = frozen_params(model.llm, linear_only=linear, skip=skip)
        done.keep_originals()
        to_bf16(done.bf16)
    if bf16_autocast:  # peft casts a LoRA layer's input to its fp32 weights' dtype, autocast casts it back
        for layer in model.llm.modules():
            if getattr(layer, "cast_input_dtype_enabled", False):  # peft's switch for that cast
                layer.cast_input_dtype_enabled = False
                done.uncast.append(layer)
    if cfg.compile:
        for layer in model.llm.layers:
            layer.compile(dynamic=True)
            done.compiled.append(layer)
    log.info("training step: %s", done.describe())
    return done


def build_optimizer(groups: list[dict[str, Any]], sharded: bool = False) -> torch.optim.AdamW:
    """AdamW over `param_groups`: one fused kernel for all parameters where PyTorch has it for plain tensors
    (CPU and CUDA), the multi-tensor (`foreach`) path for sharded (DTensor) parameters."""
    kind = {"foreach": True} if sharded else {"fused": True}
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, **kind)


@dataclass
class StepResult:
    loss: float  # mean over the micro-batches (this process)
    tokens: int  # attended tokens (padding excluded)
    samples: int
    grad_norm: torch.Tensor


def train_step(
    wrapped: nn.Module,
    model: nn.Module,
    next_batch: Callable[[], Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    strategy: Any,
    autocast: Any,
    grad_accum: int = 1,
    max_grad_norm: float = 0.0,
) -> StepResult:
    """One optimizer step of `grad_accum` micro-batches: forward (LM head at labelled positions only) and
    backward under `autocast`, gradient clipping, the optimizer and scheduler steps, gradients freed."""
    loss_sum, tokens, samples = 0.0, 0, 0
    for micro in range(grad_accum):
        with record_function("step.data"):  # phases named for profiles (bench/train_step.py --profile)
            batch = next_batch()
        sync = micro == grad_accum - 1
        with strategy.no_sync(wrapped, sync):
            with record_function("step.forward"), autocast:
                out = wrapped(**batch, return_logits=False)
            with record_function("step.backward"):
                (out.loss / grad_accum).backward()
        kill_point("train_step")
        loss_sum += float(out.loss.detach())
        mask = batch.get("attention_mask")
        tokens += int(batch["input_ids"].numel() if mask is None else mask.sum())
        samples += len(batch.get("sample_ids") or batch["input_ids"])
    with record_function("step.optimizer"):
        grad_norm = strategy.clip_grad_norm(model, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum / grad_accum, tokens, samples, grad_norm)
