"""LoRA on the LLM (peft), optionally gated to prompts that carry an image.

A gated adapter stays apart from the base weights (it is saved with the model) and is applied only where the
prompt has an image: a batch without images runs under peft's `disable_adapter()` at inference, and in a mixed
batch every LoRA branch output is multiplied by a per-row (per-sample, for packed rows) 0/1 mask. Text-only
prompts therefore get exactly the base LLM's outputs, during training and after it (InternLM-XComposer2's
Partial LoRA applies adapters to image tokens only; this is the per-prompt version of that idea).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vlmkit.config import LoRAConfig


def wrap_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """`model` (a transformers causal LM) wrapped with peft LoRA adapters on `cfg.target_modules`."""
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    return get_peft_model(model, peft_cfg)


def has_lora(llm_model: nn.Module) -> bool:
    """Whether a (wrapped) LLM carries unmerged peft adapters."""
    return hasattr(llm_model, "merge_and_unload")


class ImageGate:
    """Applies a peft model's LoRA branches only to the rows (or packed samples) that hold an image.

    `rows(mask)` sets the gate for the next forward passes: mask [B] or [B, T] of 0/1 (None: adapters on
    everywhere). The mask stays set until the next call, so a backward pass that recomputes activations
    (gradient checkpointing) sees the same gate as its forward.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        self.peft_model = peft_model
        self.mask: torch.Tensor | None = None
        self.handles = []
        for name, module in peft_model.named_modules():
            if name.split(".")[-2:-1] == ["lora_B"] and isinstance(module, nn.Linear):
                self.handles.append(module.register_forward_hook(self._hook))
        if not self.handles:
            raise ValueError("lora.gate: the LLM has no LoRA adapters to gate")

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.mask is None:
            return None
        mask = self.mask.to(output.device, output.dtype)
        # [B] -> [B, 1, 1]; [B, T] -> [B, T, 1] (the LoRA branch output is [B, T, out])
        return output * (mask.view(-1, 1, 1) if mask.dim() == 1 else mask.unsqueeze(-1))

    def set(self, mask: torch.Tensor | None) -> None:
        self.mask = mask

    @contextlib.contextmanager
    def rows(self, with_image: torch.Tensor) -> Iterator[None]:
        """Run the body with the adapters on only where `with_image` [B] / [B, T] (bool) is true."""
        if bool(with_image.all()):
            self.set(None)
            yield
        elif not with_image.any() and not torch.is_grad_enabled():
            self.set(None)
            with self.peft_model.disable_adapter():  # the base model's exact path, and no LoRA work
                yield
        else:
            self.set(with_image.float())
            yield

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.mask = [], None


def rows_with_image(
    input_ids: torch.Tensor, image_token_id: int, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Which rows hold an image: [B] bool; for packed rows (position ids restarting at 0 inside a row), which
    tokens belong to a sample that holds an image: [B, T] bool."""
    is_image = input_ids == image_token_id  # [B, T]
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape != input_ids.shape:
        return is_image.any(dim=1)
    starts = position_ids == 0  # [B, T]
    if int(starts.sum()) <= input_ids.shape[0]:  # one sample per row
        return is_image.any(dim=1)
    segment = starts.long().cumsum(dim=1)  # [B, T]: 1, 1, ..., 2, 2, ... (0 before a row's first start)
    seg_has = torch.zeros(
        input_ids.shape[0], int(segment.max()) + 1, dtype=torch.long, device=input_ids.device
    )
    seg_has.scatter_reduce_(1, segment, is_image.long(), reduce="amax")  # [B, segments]
    return seg_has.gather(1, segment) > 0  # [B, T]
