"""Vision towers: `forward(pixels[B,3,H,W]) -> features[B,N,Dv]`, built by id from `VisionConfig`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.registry import Registry

VISION_TOWERS: Registry = Registry("vision tower")


class VisionTower(nn.Module):
    """Interface every tower implements (see docs/architecture.md)."""

    feature_dim: int
    image_size: int
    image_mean: Sequence[float]
    image_std: Sequence[float]

    def num_patches(self, image_size: int | None = None) -> int:
        """Number of feature tokens N for a square image of `image_size` (default: the tower's)."""
        raise NotImplementedError

    def grid_size(self, image_size: int | None = None) -> int:
        """Side of the (square) patch grid."""
        return int(round(self.num_patches(image_size) ** 0.5))

    @property
    def block_cls(self) -> tuple[type[nn.Module], ...]:
        """Transformer block class(es), for FSDP wrapping and activation checkpointing."""
        raise NotImplementedError

    def transform(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> normalized float tensor [3, S, S] (plain square resize)."""
        image = image.convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 255.0  # [S, S, 3]
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())

    def hf_config_dict(self) -> dict | None:
        """The transformers config of a wrapped HF encoder (None for non-HF towers); used by save."""
        return None


class ViTBlock(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


@VISION_TOWERS.register("vit")
class SmallViT(VisionTower):
    """A small ViT defined here, trainable from scratch (the embedded default's tower)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        v = cfg.vit
        if cfg.image_size % v.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {v.patch_size}")
        self.cfg = cfg
        self.image_size = cfg.image_size
        self.image_mean, self.image_std = cfg.image_mean, cfg.image_std
        self.patch_size = v.patch_size
        self.feature_dim = v.dim
        self.num_prefix = 1 if v.cls_token else 0
        grid = cfg.image_size // v.patch_size
        self.patch_embed = nn.Conv2d(3, v.dim, kernel_size=v.patch_size, stride=v.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, v.dim)) if v.cls_token else None
        self.pos = nn.Parameter(torch.randn(1, grid * grid + self.num_prefix, v.dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(v.dim, v.heads, v.mlp_ratio) for _ in range(v.depth))
        self.norm = nn.LayerNorm(v.dim)
        self.select_layer = cfg.select_layer
        self.drop_prefix = cfg.drop_prefix_tokens

    def num_patches(self, image_size: int | None = None) -> int:
        return ((image_size or self.image_size) // self.patch_size) ** 2

    @property
    def block_cls(self) -> tuple[type[nn.Module], ...]:
        return (ViTBlock,)

    def hidden_states(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """All layer outputs: [embeddings, block_1, ..., block_L (final-normed)], each [B, P+N, D]."""
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # [B, N, D]
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        states[-1] = self.norm(x)
        return states

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> features [B, N, D] from `select_layer` (CLS dropped)."""
        x = self.hidden_states(pixels)[self.select_layer]
        return x[:, self.num_prefix :] if self.drop_prefix else x

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embedding [B, D] from the final layer (CLS token, or mean of patches)."""
        x = self.hidden_states(pixels)[-1]
        return x[:, 0] if self.cls is not None else x.mean(dim=1)


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    """Build the tower named by `cfg.kind` (pretrained weights loaded where the kind has them)."""
    return VISION_TOWERS.get(cfg.kind)(cfg)
