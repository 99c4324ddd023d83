"""Adding a part is one class + one registration: a new tower and a new bridge, each with its own settings,
defined here (no edit anywhere else) and used from a recipe dict, trained, saved and loaded."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from vlmkit.config import BridgeConfig, ConfigError, ModelConfig, VisionConfig, from_dict
from vlmkit.constants import IGNORE_INDEX
from vlmkit.models.bridges import BRIDGES, Bridge
from vlmkit.models.vision import VISION_TOWERS, VisionTower
from vlmkit.models.vlm import VisionLanguageModel

from conftest import random_image


@dataclass
class PatchGridConfig(VisionConfig):
    """A test tower: one linear map per `patch`-px patch."""

    patch: int = 8
    dim: int = 24


class PatchGridTower(VisionTower):
    def __init__(self, cfg: PatchGridConfig) -> None:
        super().__init__()
        self.image_size, self.image_mean, self.image_std = cfg.image_size, cfg.image_mean, cfg.image_std
        self.patch, self.feature_dim = cfg.patch, cfg.dim
        self.proj = nn.Linear(3 * cfg.patch * cfg.patch, cfg.dim)

    def num_patches(self, image_size: int | None = None) -> int:
        return ((image_size or self.image_size) // self.patch) ** 2

    @property
    def block_cls(self) -> tuple[type[nn.Module], ...]:
        return (nn.Linear,)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, N, D]
        p = self.patch
        x = pixels.unfold(2, p, p).unfold(3, p, p)  # [B, 3, S/p, S/p, p, p]
        x = x.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # [B, N, 3*p*p]
        return self.proj(x)


@dataclass
class GatedLinearConfig(BridgeConfig):
    """A test bridge: a linear projection scaled by `scale`."""

    scale: float = 2.0


class GatedLinearBridge(Bridge):
    def __init__(self, vision_dim: int, llm_dim: int, cfg: GatedLinearConfig) -> None:
        super().__init__(vision_dim, llm_dim, cfg)
        self.proj = nn.Linear(vision_dim, llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.cfg.scale * self.proj(features)


@pytest.fixture
def registered():
    VISION_TOWERS.register("patchgrid-test", config=PatchGridConfig)(PatchGridTower)
    BRIDGES.register("gatedlinear-test", config=GatedLinearConfig)(GatedLinearBridge)
    try:
        yield
    finally:
        VISION_TOWERS.unregister("patchgrid-test")
        BRIDGES.unregister("gatedlinear-test")


RECIPE = {
    "vision": {"kind": "patchgrid-test", "image_size": 32, "patch": 8, "dim": 24},
    "bridge": {"kind": "gatedlinear-test", "scale": 0.5},
    "llm": {"kind": "tiny"},
}


def test_new_tower_and_bridge_from_a_recipe_train_save_and_load(registered, tmp_path):
    cfg = from_dict(ModelConfig, RECIPE)
    assert isinstance(cfg.vision, PatchGridConfig) and cfg.vision.dim == 24
    assert isinstance(cfg.bridge, GatedLinearConfig) and cfg.bridge.scale == 0.5
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(cfg)
    assert model.tokens_per_image() == 16
    batch = model.prepare_prompts(["<image>\nWhat is it?"], [[random_image(0)]])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.image_token_id, IGNORE_INDEX)
    out = model(**batch, labels=labels)
    out.loss.backward()
    assert model.vision.proj.weight.grad.abs().sum() > 0 and model.bridge.proj.weight.grad.abs().sum() > 0

    model.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.cfg.bridge, GatedLinearConfig) and loaded.cfg.bridge.scale == 0.5
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)


def test_new_kinds_own_keys_are_checked(registered):
    with pytest.raises(ConfigError, match="'bridge.depth' for kind 'gatedlinear-test'; allowed: .*scale"):
        from_dict(ModelConfig, {**RECIPE, "bridge": {"kind": "gatedlinear-test", "depth": 2}})
