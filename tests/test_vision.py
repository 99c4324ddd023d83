"""Vision towers: own ViT, transformers encoders (CLIP, SigLIP, DINOv2, generic) and fused towers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPVisionModel,
    SiglipVisionModel,
)
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer
from transformers.models.vit.modeling_vit import ViTLayer

from vlmkit.config import ConfigError, VisionConfig
from vlmkit.models.vision import (
    VISION_TOWERS,
    FusedVisionTower,
    HFVisionTower,
    SmallViT,
    ViTBlock,
    ViTConfig,
    build_vision_tower,
)

from conftest import random_image

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
HF_CONFIGS = {
    "clip_vision_model": {**TINY, "intermediate_size": 64},
    "siglip_vision_model": {**TINY, "intermediate_size": 64},
    "dinov2": {**TINY, "mlp_ratio": 2},
    "dinov2_with_registers": {**TINY, "mlp_ratio": 2, "num_register_tokens": 2},
    "vit": {**TINY, "intermediate_size": 64},  # generic AutoModel path (prefix count inferred)
}
PREFIX = {"clip_vision_model": 1, "siglip_vision_model": 0, "dinov2": 1, "dinov2_with_registers": 3, "vit": 1}
BLOCK = {
    "clip_vision_model": CLIPEncoderLayer,
    "siglip_vision_model": SiglipEncoderLayer,
    "dinov2": Dinov2Layer,
    "dinov2_with_registers": Dinov2WithRegistersLayer,
    "vit": ViTLayer,
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGENET_MEAN = [0.485, 0.456, 0.406]


def hf_cfg(model_type: str, hf: dict | None = None, **overrides) -> VisionConfig:
    """A tiny `hf` tower config; `hf` updates the transformers config, `overrides` the VisionConfig."""
    hf_config = {"model_type": model_type, **HF_CONFIGS[model_type], **(hf or {})}
    return VisionConfig.make("hf", hf_config=hf_config, **overrides)


def hf_tower(model_type: str, hf: dict | None = None, **overrides) -> HFVisionTower:
    torch.manual_seed(0)
    return build_vision_tower(hf_cfg(model_type, hf, **overrides)).eval()


def first_block_grads(tower: HFVisionTower) -> list[torch.Tensor | None]:
    block = next(m for m in tower.model.modules() if isinstance(m, tower.block_cls))
    return [p.grad for p in block.parameters()]


def reference_states(tower: HFVisionTower, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states


def manual_transform(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    array = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(((array / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)).float()


# ------------------------------------------------------------------------------------------------- hf
@pytest.mark.parametrize("model_type", list(HF_CONFIGS))
def test_hf_tower_shapes_prefix_and_blocks(model_type: str) -> None:
    tower = hf_tower(model_type)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = tower(pixels)
    assert features.shape == (2, 16, 32)
    assert (tower.feature_dim, tower.image_size, tower.num_patches(), tower.grid_size()) == (32, 32, 16, 4)
    assert tower.num_prefix_tokens == PREFIX[model_type]
    states = reference_states(tower, pixels)
    assert states[-2].shape[1] == 16 + PREFIX[model_type]
    torch.testing.assert_close(features, states[-2][:, PREFIX[model_type] :])
    assert tower.block_cls == (BLOCK[model_type],)
    assert sum(isinstance(m, BLOCK[model_type]) for m in tower.model.modules()) == 2


@pytest.mark.parametrize("select_layer", [-1, 0, 1])
def test_select_layer_is_honored(select_layer: int) -> None:
    tower = hf_tower("dinov2_with_registers", select_layer=select_layer)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features = tower(pixels)
    states = reference_states(tower, pixels)
    torch.testing.assert_close(features, states[select_layer][:, 3:])
    others = [i for i in range(-3, 0) if i % 3 != select_layer % 3]
    assert all(not torch.allclose(features, states[i][:, 3:]) for i in others)


def test_keep_prefix_tokens_counts_them() -> None:
    tower = hf_tower("clip_vision_model", drop_prefix_tokens=False)
    with torch.no_grad():
        features = tower(torch.randn(1, 3, 32, 32))
    assert features.shape[1] == tower.num_patches() == 17
    assert tower.grid_size() == 4


def test_wrapped_module_classes_and_config_dict() -> None:
    clip, siglip = hf_tower("clip_vision_model"), hf_tower("siglip_vision_model")
    assert type(clip.model) is CLIPVisionModel and type(siglip.model) is SiglipVisionModel
    d = clip.hf_config_dict()
    assert d["model_type"] == "clip_vision_model" and d["hidden_size"] == 32 and d["patch_size"] == 8


def test_composite_config_takes_vision_part() -> None:
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    cfg = VisionConfig.make(
        "hf",
        hf_config={
            "model_type": "clip",
            "vision_config": HF_CONFIGS["clip_vision_model"],
            "text_config": text,
        },
    )
    tower = build_vision_tower(cfg)
    assert type(tower.model) is CLIPVisionModel and tower.num_patches() == 16


def test_hf_config_overrides_image_size_and_sets_normalization() -> None:
    tower = hf_tower("clip_vision_model", image_size=64, image_mean=[0.1] * 3)
    assert tower.image_size == 32  # the HF config wins
    assert tower.image_mean == pytest.approx(CLIP_MEAN)  # CLIP's released normalization
    assert hf_tower("dinov2").image_mean == pytest.approx(IMAGENET_MEAN)
    assert hf_tower("siglip_vision_model").image_std == pytest.approx([0.5] * 3)
    own = hf_tower("siglip_vision_model", {"image_mean": [0.2, 0.3, 0.4], "image_std": [0.9, 0.8, 0.7]})
    assert own.image_mean == [0.2, 0.3, 0.4] and own.image_std == [0.9, 0.8, 0.7]  # from the HF config dict
    assert hf_tower("vit").image_mean == [0.5] * 3  # unknown type: VisionConfig's


def test_transform_resizes_and_normalizes() -> None:
    tower = hf_tower("clip_vision_model")
    image = random_image(1, (40, 30))
    out = tower.transform(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, manual_transform(image, 32, CLIP_MEAN, tower.image_std))


def test_interpolates_to_other_image_sizes() -> None:
    for model_type in ("clip_vision_model", "dinov2"):
        tower = hf_tower(model_type)
        with torch.no_grad():
            features = tower(torch.randn(1, 3, 48, 48))
        assert features.shape == (1, tower.num_patches(48), 32) == (1, 36, 32)


def test_load_from_local_dirs_and_rebuild_from_config_dict(tmp_path) -> None:
    torch.manual_seed(0)
    encoder = CLIPVisionModel(
        AutoConfig.for_model("clip_vision_model", **HF_CONFIGS["clip_vision_model"])
    ).eval()
    encoder.save_pretrained(tmp_path / "enc")
    mean, std = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
    (tmp_path / "enc" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": mean, "image_std": std})
    )
    tower = build_vision_tower(VisionConfig.make("hf", path=str(tmp_path / "enc"))).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(pixels), expected)  # pretrained weights, not random ones
    assert (tower.image_mean, tower.image_std) == (mean, std)

    rebuilt = build_vision_tower(VisionConfig.make("hf", hf_config=tower.hf_config_dict())).eval()
    rebuilt.load_state_dict(tower.state_dict())
    assert (rebuilt.image_mean, rebuilt.image_std) == (mean, std)  # kept without the preprocessor file
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels), expected)


def test_load_vision_part_of_full_siglip_checkpoint(tmp_path) -> None:
    text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    config = AutoConfig.for_model(
        "siglip", vision_config=HF_CONFIGS["siglip_vision_model"], text_config={**text, "vocab_size": 64}
    )
    torch.manual_seed(0)
    full = AutoModel.from_config(config).eval()
    full.save_pretrained(tmp_path / "siglip")
    tower = build_vision_tower(VisionConfig.make("hf", path=str(tmp_path / "siglip"))).eval()
    assert type(tower.model) is SiglipVisionModel and tower.num_prefix_tokens == 0
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tower(pixels), expected)


def test_gradient_reaches_tower_params() -> None:
    tower = hf_tower("dinov2").train()
    tower(torch.randn(2, 3, 32, 32)).pow(2).mean().backward()
    patch = tower.model.embeddings.patch_embeddings.projection.weight
    assert patch.grad is not None and patch.grad.abs().sum() > 0
    grads = first_block_grads(tower)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_hf_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one of vision.path"):
        build_vision_tower(VisionConfig.make("hf"))
    with pytest.raises(ValueError, match="model_type"):
        build_vision_tower(VisionConfig.make("hf", hf_config={"hidden_size": 32}))


def test_registry_lists_towers() -> None:
    assert {"vit", "hf", "fused"} <= set(VISION_TOWERS.names())
    with pytest.raises(ConfigError, match="known vision towers: fused, hf, vit"):
        build_vision_tower(VisionConfig.make("nope"))


# ---------------------------------------------------------------------------------------------- fused
def test_fused_dinov2_siglip_concatenates_per_tower_features() -> None:
    torch.manual_seed(0)
    fused = build_vision_tower(
        VisionConfig.make("fused", towers=[hf_cfg("dinov2"), hf_cfg("siglip_vision_model")])
    )
    fused.eval()
    assert isinstance(fused, FusedVisionTower) and isinstance(fused.towers, torch.nn.ModuleList)
    assert (fused.feature_dim, fused.image_size, fused.num_patches(), fused.grid_size()) == (64, 32, 16, 4)
    assert set(fused.block_cls) == {Dinov2Layer, SiglipEncoderLayer}
    images = [random_image(2), random_image(3, (32, 32))]
    pixels = torch.stack([fused.transform(im) for im in images])  # [2, 3, 32, 32]
    assert pixels.shape == (2, 3, 32, 32)
    with torch.no_grad():
        features = fused(pixels)
        dino, siglip = fused.towers
        expected = [torch.stack([t.transform(im) for im in images]) for t in (dino, siglip)]
        expected = torch.cat([dino(expected[0]), siglip(expected[1])], dim=-1)
    assert features.shape == (2, 16, 64)
    torch.testing.assert_close(
        features, expected, atol=1e-4, rtol=1e-4
    )  # each tower saw its own normalization
    assert dino.image_mean != siglip.image_mean


def test_fused_with_different_sizes_same_grid_resizes_per_tower() -> None:
    siglip = hf_cfg("siglip_vision_model", {"image_size": 48, "patch_size": 12})  # 48 / 12 = 4x4, like 32 / 8
    torch.manual_seed(0)
    fused = build_vision_tower(VisionConfig.make("fused", towers=[hf_cfg("dinov2"), siglip])).eval()
    assert fused.image_size == 48
    image = random_image(4)
    pixels = fused.transform(image)[None]  # [1, 3, 48, 48]
    with torch.no_grad():
        features = fused(pixels)
        siglip_alone = fused.towers[1](fused.towers[1].transform(image)[None])
    assert features.shape == (1, 16, 64)
    torch.testing.assert_close(features[..., 32:], siglip_alone, atol=1e-4, rtol=1e-4)


def test_fused_grid_mismatch_is_a_clear_error() -> None:
    siglip = hf_cfg("siglip_vision_model", {"patch_size": 16})
    with pytest.raises(
        ValueError, match="fused towers have different patch grids: dinov2 4x4 vs siglip_vision_model 2x2"
    ):
        build_vision_tower(VisionConfig.make("fused", towers=[hf_cfg("dinov2"), siglip]))
    with pytest.raises(ValueError, match="token counts"):
        build_vision_tower(
            VisionConfig.make(
                "fused", towers=[hf_cfg("dinov2"), hf_cfg("clip_vision_model", drop_prefix_tokens=False)]
            )
        )


def test_fused_gradient_reaches_every_tower() -> None:
    fused = build_vision_tower(
        VisionConfig.make("fused", towers=[hf_cfg("dinov2"), hf_cfg("siglip_vision_model")])
    )
    fused(torch.randn(1, 3, 32, 32)).pow(2).mean().backward()
    for tower in fused.towers:
        grads = first_block_grads(tower)
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------------------ vit
def test_small_vit_contract() -> None:
    cfg = VisionConfig.make("vit", image_size=32, vit=ViTConfig(dim=32, depth=2, heads=2, patch_size=8))
    tower = build_vision_tower(cfg).eval()
    assert isinstance(tower, SmallViT) and tower.block_cls == (ViTBlock,)
    with torch.no_grad():
        features = tower(torch.randn(2, 3, 32, 32))
        states = tower.hidden_states(torch.zeros(1, 3, 32, 32))
    assert features.shape == (2, tower.num_patches(), 32) == (2, 16, 32)
    assert len(states) == 3 and tower.grid_size() == 4
    keep = build_vision_tower(VisionConfig.make("vit", image_size=32, drop_prefix_tokens=False, vit=cfg.vit))
    with torch.no_grad():
        assert keep(torch.randn(1, 3, 32, 32)).shape[1] == keep.num_patches() == 17
    assert keep.grid_size() == 4
    assert tower.transform(random_image(5)).shape == (3, 32, 32)


@pytest.mark.parametrize("model_type", ["dinov2", "clip_vision_model", "siglip_vision_model"])
def test_hf_tower_runs_at_a_set_resolution(model_type):
    import copy

    base = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    cfg = VisionConfig.make("hf", hf_config={"model_type": model_type, **base}, resolution=48)
    tower = build_vision_tower(copy.deepcopy(cfg))
    assert tower.image_size == 48 and tower.num_patches() == 36
    img = Image.new("RGB", (50, 40), (200, 10, 10))
    pixels = tower.transform(img)
    assert pixels.shape == (3, 48, 48)
    out = tower(pixels[None])
    assert out.shape == (1, 36, 32)
