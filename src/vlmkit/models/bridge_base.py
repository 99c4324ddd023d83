"""The bridge interface and its registry (the bridges register in `bridges.py` and the modules it imports)."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlmkit.config import BridgeConfig
from vlmkit.registry import Registry

BRIDGES: Registry = Registry("bridge")


class Bridge(nn.Module):
    """Interface: every bridge maps [B, N, vision_dim] -> [B, num_tokens(N), llm_dim]."""

    def __init__(self, vision_dim: int, llm_dim: int, cfg: BridgeConfig) -> None:
        super().__init__()
        self.vision_dim, self.llm_dim, self.cfg = vision_dim, llm_dim, cfg

    def num_tokens(self, n: int) -> int:
        """Output tokens M for N input features (N for per-patch bridges, fixed for resamplers)."""
        return n

    def bind_llm(self, llm: Any) -> None:
        """Called once the LLM is built (before any weights are loaded): bridges whose parameters start from
        the LLM's (word embeddings) initialise them here. Default: nothing."""
