"""Fusion modes as registered strategies: `prefix` (LLaVA) and `xattn` (Flamingo). A new mode is one module here
that registers a `Fusion` subclass, imported below."""

from __future__ import annotations

from typing import Any

from vlmkit.models.fusion import prefix, xattn  # noqa: F401  (register the built-in modes)
from vlmkit.models.fusion.base import FUSIONS, Fusion, LLMInputs

__all__ = ["FUSIONS", "Fusion", "LLMInputs", "build_fusion"]


def build_fusion(llm: Any, cfg: Any) -> Fusion:
    """The fusion named by `cfg.mode`, built on `llm`."""
    cfg = cfg.resolved()
    return FUSIONS.get(cfg.mode)(llm, cfg)
