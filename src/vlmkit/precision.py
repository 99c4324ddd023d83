"""Mixed precision: bf16 autocast where the hardware supports it (CUDA bf16, CPUs with AVX512-BF16 / AMX)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_bf16_supported() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 / AMX), where bf16 autocast is about 2x faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str | None = None) -> str:
    """`auto` -> `bf16` where the hardware supports it (CUDA bf16, or a CPU with native bf16), else `fp32`;
    `bf16` and `fp32` stay as they are."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision '{precision}' is not one of auto, bf16, fp32")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_bf16_supported() else "fp32"


def autocast_context(precision: str, device: str | None = None):
    """Mixed precision: `auto` is bf16 where the hardware supports it (CUDA bf16, or a CPU with native bf16),
    else fp32; `bf16` forces it; `fp32` disables it."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if resolve_precision(precision, device) == "fp32":
        return nullcontext()
    return torch.autocast("cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16)


def frozen_params(
    module: nn.Module, linear_only: bool = True, skip: set[int] = frozenset()
) -> list[tuple[nn.Parameter, torch.dtype]]:
    """`module`'s frozen floating-point parameters not yet in bf16, with their dtype: what `to_bf16` stores in
    bf16 for training under bf16 autocast.

    `linear_only`: only the weights and biases of `nn.Linear` layers, which autocast casts to bf16 at every use
    anyway, so the step computes exactly what it computed with fp32 storage, without a cast of every weight in
    every forward and without those copies kept for backward. Otherwise every frozen parameter (embeddings,
    norms): the hidden states then stay in bf16 as well, as in a model loaded in bf16. `skip`: ids of
    parameters to leave (e.g. an embedding table tied to the LM head)."""
    layers = [m for m in module.modules() if isinstance(m, nn.Linear)] if linear_only else [module]
    seen: set[int] = set(skip)
    found = []
    for layer in layers:
        for param in layer.parameters(recurse=not linear_only):
            if id(param) in seen or param.requires_grad or not param.is_floating_point():
                continue
            seen.add(id(param))
            if param.dtype != torch.bfloat16:
                found.append((param, param.dtype))
    return found


def to_bf16(params: list[tuple[nn.Parameter, torch.dtype]]) -> None:
    """Store each parameter in bf16, in place (the same Parameter objects)."""
    for param, _ in params:
        param.data = param.data.to(torch.bfloat16)
