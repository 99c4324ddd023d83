"""The server's image-feature cache: an image's visual tokens (the bridge output) kept in memory, keyed by the image's
bytes and the model, so a picture sent again (another request, the next turn of a conversation) skips
preprocessing, the vision tower and the bridge. Bounded in bytes, least recently used out first."""

from __future__ import annotations

import hashlib
import json

import torch
from PIL import Image

from vlmkit.config import to_dict
from vlmkit.infer.byte_lru import ByteLRU
from vlmkit.models.fingerprint import tower_description, weights_digest


def bytes_key(data: bytes) -> str:
    """An image's key from its encoded bytes (what the client sent)."""
    return hashlib.sha256(data).hexdigest()


def pixels_key(image: Image.Image) -> str:
    """An image's key from its decoded pixels (for callers that have no bytes)."""
    digest = hashlib.sha256(f"{image.mode}|{image.size}|".encode())
    digest.update(image.tobytes())
    return "px-" + digest.hexdigest()


def model_fingerprint(model: torch.nn.Module, images: object, dtype: torch.dtype) -> str:
    """sha256 of what an image's visual tokens depend on besides the image: the tower (config, weights,
    preprocessing), the bridge (config, weights) and the dtype."""
    tower = tower_description(model, images, dtype)  # type: ignore[arg-type]
    bridge = {"config": to_dict(model.cfg.bridge), "weights": weights_digest(model.bridge)}  # type: ignore[union-attr]
    text = json.dumps({"tower": tower, "bridge": bridge, "dtype": str(dtype)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ImageFeatureCache(ByteLRU[str, torch.Tensor]):
    """LRU map image key -> visual tokens [tiles, M, D], at most `max_bytes` of tensors (0 disables it).

    Thread-safe; `hits`, `misses`, `evictions`, `nbytes` and `len()` are what /metrics reports."""

    kind = "image cache"

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            if key not in self._items:
                self._miss()
                return None
            return self._hit(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return  # larger than the whole cache (or the cache is off)
        with self._lock:
            self._store(key, value.detach(), size)
