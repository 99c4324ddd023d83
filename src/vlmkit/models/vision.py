"""Vision towers: `forward(pixels[B,3,H,W]) -> features[B,N,Dv]`, built by id from `VisionConfig`.

Over 400 lines: three tower kinds (`vit`, `hf`, `fused`) with their configs and tiny test configs; each is
self-contained below the shared `VisionTower` contract and could move to its own module when a fourth comes.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlmkit.config import VisionConfig
from vlmkit.data.processor import ImageProcessor
from vlmkit.log import get_logger
from vlmkit.models.hf_compat import enable_activation_checkpointing
from vlmkit.registry import Registry

log = get_logger(__name__)

VISION_TOWERS: Registry = Registry("vision tower")
VIT_WEIGHTS = "vision.safetensors"


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
        """PIL image -> normalized float tensor [3, S, S] (plain square resize, as the `Processor`'s `resize`
        mode: models are fed through their processor; this is for using a tower on its own)."""
        return ImageProcessor(self.image_size, self.image_mean, self.image_std).tensors(image)[0]

    def hf_config_dict(self) -> dict | None:
        """The transformers config of a wrapped HF encoder (None for non-HF towers); used by save."""
        return None

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block's activations during backward instead of keeping them."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")


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


@dataclass
class ViTConfig:
    """The shape of the project's own small ViT (trainable from scratch)."""

    dim: int = 128
    depth: int = 3
    heads: int = 4
    mlp_ratio: float = 4.0
    patch_size: int = 8
    cls_token: bool = True


@dataclass
class ViTTowerConfig(VisionConfig):
    """`vit`: the project's own small ViT; `vit` sets its shape."""

    vit: ViTConfig = field(default_factory=ViTConfig)


def _tiny_vit() -> dict[str, VisionConfig]:
    return {
        "vit": ViTTowerConfig(
            kind="vit", image_size=32, vit=ViTConfig(dim=32, depth=2, heads=2, patch_size=8)
        )
    }


@VISION_TOWERS.register("vit", config=ViTTowerConfig, tiny=_tiny_vit)
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
        self.gradient_checkpointing = False
        if cfg.path:
            self.load_weights(cfg.path)

    def load_weights(self, path: str | Path) -> None:
        """Load pretrained weights (e.g. from `vlmkit pretrain-vision`): a .safetensors file or a directory
        holding `vision.safetensors`."""
        from safetensors.torch import load_file

        file = Path(path)
        if file.is_dir():
            file = file / VIT_WEIGHTS
        if not file.is_file():
            raise FileNotFoundError(f"vision.path '{path}': no {VIT_WEIGHTS} weights found there")
        missing, unexpected = self.load_state_dict(load_file(str(file)), strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"{file} does not match this ViT config: missing={missing[:4]} unexpected={unexpected[:4]}"
            )

    def num_patches(self, image_size: int | None = None) -> int:
        kept = 0 if self.drop_prefix else self.num_prefix
        return self.grid_size(image_size) ** 2 + kept

    def grid_size(self, image_size: int | None = None) -> int:
        return (image_size or self.image_size) // self.patch_size

    @property
    def block_cls(self) -> tuple[type[nn.Module], ...]:
        return (ViTBlock,)

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def hidden_states(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """All layer outputs: [embeddings, block_1, ..., block_L (final-normed)], each [B, P+N, D]."""
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos
        states = [x]
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
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


# ------------------------------------------------------------------------------------ transformers towers
# Normalization of the released checkpoints, used when neither the HF config nor a preprocessor_config.json
# carries `image_mean` / `image_std`.
_CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_HALF_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_KNOWN_NORM = {
    "clip_vision_model": _CLIP_NORM,
    "siglip_vision_model": _HALF_NORM,
    "dinov2": _IMAGENET_NORM,
    "dinov2_with_registers": _IMAGENET_NORM,
}


def _known_prefix_tokens(config: Any) -> int | None:
    """Tokens ahead of the patch tokens for the model types we know (None: infer by a dry run)."""
    model_type = config.model_type
    if model_type in ("clip_vision_model", "dinov2"):
        return 1  # CLS
    if model_type == "siglip_vision_model":
        return 0
    if model_type == "dinov2_with_registers":
        return 1 + int(config.num_register_tokens)  # CLS + registers
    return None


def _first_int(value: Any) -> int:
    """`224` or `[224, 224]` -> 224 (HF configs use both forms)."""
    return int(value[0] if isinstance(value, list | tuple) else value)


def _vision_part(config: Any) -> Any:
    """A composite config (`clip`, `siglip`, ...) -> its `vision_config`; a vision config -> itself."""
    return getattr(config, "vision_config", None) or config


def _preprocessor_norm(path: str) -> tuple[list[float], list[float]] | None:
    """`image_mean` / `image_std` from the checkpoint's preprocessor_config.json, when it has one."""
    local = Path(path) / "preprocessor_config.json"
    file: str | Path | None = local if local.is_file() else None
    if file is None and not Path(path).exists():
        from transformers.utils import cached_file

        try:
            file = cached_file(path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError):  # offline, or not a valid hub id
            file = None
    if file is None:
        return None
    data = json.loads(Path(file).read_text())
    if "image_mean" not in data or "image_std" not in data:
        return None
    return list(data["image_mean"]), list(data["image_std"])


def _load_hf_encoder(cfg: VisionConfig) -> nn.Module:
    """The transformers vision encoder named by `cfg.path` (pretrained) or `cfg.hf_config` (random), fp32."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if (cfg.path is None) == (cfg.hf_config is None):
        raise ValueError(
            "vision.kind 'hf' needs exactly one of vision.path (hub id or local dir) or "
            "vision.hf_config (a dict with 'model_type')"
        )
    if cfg.hf_config is not None:
        data = dict(cfg.hf_config)
        model_type = data.pop("model_type", None)
        if not model_type:
            raise ValueError("vision.hf_config needs a 'model_type' (e.g. 'clip_vision_model', 'dinov2')")
        config = _vision_part(AutoConfig.for_model(model_type, **data))
        return AutoModel.from_config(config, dtype=torch.float32)
    config = _vision_part(AutoConfig.from_pretrained(cfg.path))
    model_cls = MODEL_MAPPING[type(config)]
    model, info = model_cls.from_pretrained(
        cfg.path, config=config, dtype=torch.float32, output_loading_info=True
    )
    missing = list(info.get("missing_keys", []))
    if missing:
        total = len(model.state_dict())
        if len(missing) >= total:
            raise ValueError(
                f"vision.path '{cfg.path}' holds none of the weights of {model_cls.__name__}; "
                "is it a vision encoder (or a CLIP/SigLIP-style model with one)?"
            )
        log.warning("vision tower %s: %d of %d weights not in the checkpoint", cfg.path, len(missing), total)
    return model


def _encoder_block_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """Classes in the encoder's `layer` / `layers` / `blocks` ModuleList (else the `_no_split_modules`)."""
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and name.split(".")[-1] in ("layer", "layers", "blocks")
        ):
            return tuple(dict.fromkeys(type(m) for m in module))
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = (
        type(m) for m in model.modules() if type(m).__name__ in names and "Embedding" not in type(m).__name__
    )
    return tuple(dict.fromkeys(found))


@dataclass
class HFTowerConfig(VisionConfig):
    """`hf`: a transformers vision encoder from `path` (hub id or local dir) or `hf_config` (a dict with
    `model_type`: random weights); `resolution`: input size if not the checkpoint's own (positions
    interpolated)."""

    hf_config: dict[str, Any] | None = None
    resolution: int | None = None


_TINY_HF = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def _tiny_hf() -> dict[str, VisionConfig]:
    types = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", "dinov2": "dinov2"}
    return {
        name: HFTowerConfig(kind="hf", hf_config={"model_type": t, **_TINY_HF}) for name, t in types.items()
    }


@VISION_TOWERS.register("hf", config=HFTowerConfig, tiny=_tiny_hf)
class HFVisionTower(VisionTower):
    """Any ViT-style transformers vision encoder: CLIP, SigLIP, DINOv2 (+registers), ViT, ... .

    Built from `cfg.path` (hub id or local dir, loaded with `from_pretrained`; a full `clip` / `siglip`
    checkpoint contributes its vision part) or from `cfg.hf_config` (random weights). `self.model` is the
    transformers module itself (`CLIPVisionModel` for `clip_vision_model`, `SiglipVisionModel`, `Dinov2Model`,
    ...), so its state dict maps onto transformers' own composite models.

    Features are `hidden_states[cfg.select_layer]` (-2: the second-to-last layer output, as in LLaVA), with
    the prefix tokens dropped when `cfg.drop_prefix_tokens` (CLS for CLIP/DINOv2/ViT, CLS + registers for
    DINOv2-with-registers, none for SigLIP; inferred once by a dry run for other model types).

    `image_size` and `patch_size` come from the HF config (`cfg.image_size` is used only when the HF config has
    no `image_size`); `cfg.resolution` overrides the input size (position embeddings interpolated). `image_mean` / `image_std` come from, in order: the HF config, the checkpoint's
    preprocessor_config.json, the model type's released normalization, `cfg.image_mean` / `cfg.image_std`;
    they are then written onto `self.model.config` so `hf_config_dict()` rebuilds the same transform.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _load_hf_encoder(cfg)
        config = self.model.config
        self.model_type: str = config.model_type
        if getattr(config, "patch_size", None) is None or getattr(config, "hidden_size", None) is None:
            raise ValueError(
                f"vision tower '{self.model_type}' is not a ViT-style encoder (its config lacks "
                "patch_size / hidden_size)"
            )
        self.patch_size = _first_int(config.patch_size)
        native = _first_int(getattr(config, "image_size", None) or cfg.image_size)
        self.native_size = native
        self.image_size = cfg.resolution or native  # a set resolution runs with interpolated positions
        self.feature_dim = int(config.hidden_size)
        self.image_mean, self.image_std = self._normalization(cfg)
        config.image_mean, config.image_std = list(self.image_mean), list(self.image_std)
        self.select_layer = cfg.select_layer
        self.drop_prefix = cfg.drop_prefix_tokens
        self._prefix_tokens = _known_prefix_tokens(config)
        self._interpolates = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        self._block_cls = _encoder_block_classes(self.model)

    def _normalization(self, cfg: VisionConfig) -> tuple[list[float], list[float]]:
        config = self.model.config
        if getattr(config, "image_mean", None) is not None and getattr(config, "image_std", None) is not None:
            return list(config.image_mean), list(config.image_std)
        found = _preprocessor_norm(cfg.path) if cfg.path else None
        if found is not None:
            return found
        if self.model_type in _KNOWN_NORM:
            mean, std = _KNOWN_NORM[self.model_type]
            return list(mean), list(std)
        return list(cfg.image_mean), list(cfg.image_std)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens ahead of the patch tokens in the encoder's sequence (CLS, registers, ...)."""
        if self._prefix_tokens is None:  # unknown model type: count once
            with torch.no_grad():
                device = next(self.model.parameters()).device
                pixels = torch.zeros(1, 3, self.image_size, self.image_size, device=device)
                seq = self._hidden_states(pixels)[self.select_layer].shape[1]
            self._prefix_tokens = seq - self.grid_size() ** 2
        return self._prefix_tokens

    def grid_size(self, image_size: int | None = None) -> int:
        return (image_size or self.image_size) // self.patch_size

    def num_patches(self, image_size: int | None = None) -> int:
        kept = 0 if self.drop_prefix else self.num_prefix_tokens
        return self.grid_size(image_size) ** 2 + kept

    @property
    def block_cls(self) -> tuple[type[nn.Module], ...]:
        return self._block_cls

    def enable_gradient_checkpointing(self) -> None:
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            raise ValueError(f"vision tower '{self.model_type}' does not support gradient checkpointing")
        enable_activation_checkpointing(self.model)

    def hf_config_dict(self) -> dict | None:
        return self.model.config.to_dict()

    def _hidden_states(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """pixels [B, 3, S, S] -> (embeddings, layer_1, ..., layer_L), each [B, P+N, D]."""
        kwargs: dict[str, Any] = {"output_hidden_states": True}
        if self._interpolates and pixels.shape[-1] != self.native_size:
            kwargs["interpolate_pos_encoding"] = True
        dtype = next(self.model.parameters()).dtype
        return self.model(pixel_values=pixels.to(dtype), **kwargs).hidden_states

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> features [B, N, D] from `select_layer` (prefix tokens dropped if asked)."""
        x = self._hidden_states(pixels)[self.select_layer]  # [B, P+N, D]
        return x[:, self.num_prefix_tokens :] if self.drop_prefix else x


def _affine(x: torch.Tensor, a: Sequence[float], b: Sequence[float], multiply: bool) -> torch.Tensor:
    """Per-channel `x * a + b` (multiply) or `(x - a) / b`; x [B, 3, S, S]."""
    a_t = torch.tensor(a, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    b_t = torch.tensor(b, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x * a_t + b_t if multiply else (x - a_t) / b_t


def _tower_name(tower: VisionTower) -> str:
    return getattr(tower, "model_type", None) or getattr(
        getattr(tower, "cfg", None), "kind", type(tower).__name__
    )


@dataclass
class FusedTowerConfig(VisionConfig):
    """`fused`: several towers on one image, features concatenated along channels; their patch grids must
    match. `image_mean` / `image_std` here are the fused input's normalization, which `forward` swaps for each
    sub-tower's own."""

    towers: list[VisionConfig] = field(default_factory=list)


def _tiny_fused() -> dict[str, VisionConfig]:
    hf = _tiny_hf()
    return {"dinov2+siglip": FusedTowerConfig(kind="fused", towers=[hf["dinov2"], hf["siglip"]])}


@VISION_TOWERS.register("fused", config=FusedTowerConfig, tiny=_tiny_fused)
class FusedVisionTower(VisionTower):
    """Several towers on one image, patch features concatenated along channels (Prismatic's DINOv2 + SigLIP).

    Transform: one [3, S, S] tensor at the largest sub-tower `image_size` S, normalized with the fused config's
    `image_mean` / `image_std`. `forward` undoes that normalization, resizes (bicubic, antialiased) to each
    sub-tower's own size where it differs, applies the sub-tower's own mean/std, and concatenates the
    features: [B, N, sum(Dv_i)]. With equal sub-tower sizes this equals running each sub-tower on its own
    `transform`. The sub-towers (`self.towers`) must yield the same patch grid and token count.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if not cfg.towers:
            raise ValueError("vision.kind 'fused' needs a non-empty vision.towers list")
        self.cfg = cfg
        self.towers = nn.ModuleList(build_vision_tower(sub) for sub in cfg.towers)
        first = self.towers[0]
        for other in self.towers[1:]:
            a, b = first.grid_size(), other.grid_size()
            if a != b:
                raise ValueError(
                    f"fused towers have different patch grids: {_tower_name(first)} {a}x{a} vs "
                    f"{_tower_name(other)} {b}x{b}"
                )
            if first.num_patches() != other.num_patches():
                raise ValueError(
                    f"fused towers yield different token counts: {_tower_name(first)} {first.num_patches()} vs "
                    f"{_tower_name(other)} {other.num_patches()} (check drop_prefix_tokens)"
                )
        self.image_size = max(t.image_size for t in self.towers)
        self.image_mean, self.image_std = list(cfg.image_mean), list(cfg.image_std)
        self.feature_dim = sum(t.feature_dim for t in self.towers)

    def _tower_size(self, tower: VisionTower, image_size: int) -> int:
        """The side a sub-tower sees when the fused input has side `image_size`."""
        return round(image_size * tower.image_size / self.image_size)

    def num_patches(self, image_size: int | None = None) -> int:
        first = self.towers[0]
        return first.num_patches(self._tower_size(first, image_size or self.image_size))

    def grid_size(self, image_size: int | None = None) -> int:
        first = self.towers[0]
        return first.grid_size(self._tower_size(first, image_size or self.image_size))

    @property
    def block_cls(self) -> tuple[type[nn.Module], ...]:
        return tuple(dict.fromkeys(cls for t in self.towers for cls in t.block_cls))

    def enable_gradient_checkpointing(self) -> None:
        for tower in self.towers:
            tower.enable_gradient_checkpointing()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] (fused normalization) -> features [B, N, sum(Dv_i)]."""
        raw = _affine(
            pixels.float(), self.image_std, self.image_mean, multiply=True
        )  # [B, 3, S, S] in [0, 1]
        features = []
        for tower in self.towers:
            size = self._tower_size(tower, pixels.shape[-1])
            x = raw
            if size != raw.shape[-1]:
                x = F.interpolate(raw, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            x = _affine(x, tower.image_mean, tower.image_std, multiply=False)  # [B, 3, s, s]
            features.append(tower(x))  # [B, N, Dv_i]
        return torch.cat(features, dim=-1)  # [B, N, sum(Dv_i)]


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    """Build the tower named by `cfg.kind` (pretrained weights loaded where the kind has them)."""
    cfg = cfg.resolved()
    return VISION_TOWERS.get(cfg.kind)(cfg)
