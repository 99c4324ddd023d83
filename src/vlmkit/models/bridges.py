"""Modality bridges: `forward(features[B,N,Dv]) -> tokens[B,M,Dl]`, built from (vision_dim, llm_dim, cfg)."""

from __future__ import annotations

import torch
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


@BRIDGES.register("linear")
class LinearBridge(Bridge):
    """One linear projection (LLaVA-1)."""

    def __init__(self, vision_dim: int, llm_dim: int, cfg: BridgeConfig) -> None:
        super().__init__(vision_dim, llm_dim, cfg)
        self.proj = nn.Linear(vision_dim, llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)  # [B, N, Dl]


@BRIDGES.register("mlp")
class MLPBridge(Bridge):
    """Linear layers with GELU between them (LLaVA-1.5 `mlp2x_gelu` at depth 2)."""

    def __init__(self, vision_dim: int, llm_dim: int, cfg: BridgeConfig) -> None:
        super().__init__(vision_dim, llm_dim, cfg)
        if cfg.depth < 1:
            raise ValueError(f"bridge.depth must be >= 1, got {cfg.depth}")
        hidden = cfg.hidden_dim or llm_dim
        dims = [vision_dim] + [hidden] * (cfg.depth - 1) + [llm_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(d_in, d_out))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)  # [B, N, Dl]


def build_bridge(vision_dim: int, llm_dim: int, cfg: BridgeConfig) -> Bridge:
    """Build the bridge named by `cfg.kind`, with optional token reduction in front of it."""
    return BRIDGES.get(cfg.kind)(vision_dim, llm_dim, cfg)
