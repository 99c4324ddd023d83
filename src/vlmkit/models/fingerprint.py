"""What a model part's outputs depend on, as a digest: the vision tower's configuration, weights and
preprocessing (`tower_description`), any module's weights (`weights_digest`). The training feature cache and the
server's image-feature cache both key their entries with these."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlmkit.confio import to_dict
from vlmkit.models.vision import VisionTower

if TYPE_CHECKING:
    from vlmkit.data.processor import ImageProcessor

# HF config entries that say where a config came from, not what the tower computes.
_HF_NOISE = {"transformers_version", "architectures", "torch_dtype", "dtype", "name_or_path"}


def _strip_sources(cfg: dict[str, Any]) -> dict[str, Any]:
    """A vision config dict without `path` / `hf_config` (recursively): where the weights and the HF config
    come from changes between stages (`portable_config` swaps a path for the full config), what they are is
    hashed separately."""
    out = {k: v for k, v in cfg.items() if k not in ("path", "hf_config")}
    out["towers"] = [_strip_sources(t) for t in cfg.get("towers", [])]
    return out


def hf_configs(tower: nn.Module) -> list[dict[str, Any]]:
    """The transformers configs of every HF (sub-)tower, without provenance entries."""
    found = []
    for module in tower.modules():
        hf = module.hf_config_dict() if isinstance(module, VisionTower) else None
        if hf is not None:
            found.append({k: v for k, v in hf.items() if not k.startswith("_") and k not in _HF_NOISE})
    return found


def weights_digest(module: nn.Module) -> str:
    """sha256 over the state dict: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy())  # the raw bytes, no copy
    return digest.hexdigest()


def preprocessing(images: ImageProcessor) -> dict[str, Any]:
    """The image settings that decide the pixels the tower sees (not where files live, not the limits)."""
    return images.settings()


def tower_description(
    model: nn.Module, images: ImageProcessor, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Everything the tower's features depend on: the tower's config (model.cfg.vision without weight sources),
    its HF configs, its weights, the preprocessing settings and the dtype."""
    tower = model.vision
    return {
        "tower_class": f"{type(tower).__module__}.{type(tower).__qualname__}",
        "config": _strip_sources(to_dict(model.cfg.vision)),
        "hf_configs": hf_configs(tower),
        "tower": {
            "image_size": int(tower.image_size),
            "mean": [float(x) for x in tower.image_mean],
            "std": [float(x) for x in tower.image_std],
            "feature_dim": int(tower.feature_dim),
            "num_patches": int(tower.num_patches()),
        },
        "preprocessing": preprocessing(images),
        "dtype": str(dtype),
        "weights_sha256": weights_digest(tower),
    }
