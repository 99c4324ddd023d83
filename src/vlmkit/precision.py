"""Mixed precision: bf16 autocast where the hardware supports it (CUDA bf16, CPUs with AVX512-BF16 / AMX)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_bf16_supported() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 / AMX), where bf16 autocast is about 2x faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_context(precision: str, device: str | None = None):
    """Mixed precision: `auto` is bf16 where the hardware supports it (CUDA bf16, or a CPU with native bf16),
    else fp32; `bf16` forces it; `fp32` disables it."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision '{precision}' is not one of auto, bf16, fp32")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "fp32":
        return nullcontext()
    if device == "cuda":
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()
    if precision == "bf16" or cpu_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()
