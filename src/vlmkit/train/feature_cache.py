"""Frozen-tower feature cache: tower outputs computed once per image, kept in safetensors shards on disk.

Over 400 lines: the fingerprint, the shard writer, the reader and the precompute (with its resume points) share
one on-disk format and are kept together so that format is defined in one place.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlmkit.faults import kill_point
from vlmkit.log import get_logger
from vlmkit.models.fingerprint import hf_configs, preprocessing, tower_description

if TYPE_CHECKING:
    from vlmkit.config import DataConfig
    from vlmkit.data.dataset import VLMDataset
    from vlmkit.data.processor import ImageProcessor

log = get_logger(__name__)

FORMAT_VERSION = 1  # bump when the stored layout or the meaning of a key changes
CACHE_DIRNAME = "feature_cache"
SHARD_GLOB = "shard-*.safetensors"
FINGERPRINT_NAME = "fingerprint.json"
DEFAULT_SHARD_BYTES = 256 * 2**20


# ------------------------------------------------------------------------------------------------ keys
def image_key(source: str | Path | bytes) -> str:
    """sha256 hex of an image's bytes: a file (path) or a decoded `data:` URL (bytes)."""
    digest = hashlib.sha256()
    if isinstance(source, bytes | bytearray | memoryview):
        digest.update(source)
        return digest.hexdigest()
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tower_fingerprint(
    model: nn.Module, images: ImageProcessor, dtype: torch.dtype = torch.float32
) -> tuple[str, dict[str, Any]]:
    """(sha256 hex, description) of everything the cached features depend on (`tower_description`) and the
    cache's format version."""
    desc = {"format": FORMAT_VERSION, **tower_description(model, images, dtype)}
    text = json.dumps(desc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), desc


# ------------------------------------------------------------------------------------------------ cache
class FeatureCache:
    """Tower features [tiles, N, Dv] per image, keyed by the sha256 of the image's bytes.

    Lives in one directory per tower fingerprint (see `tower_fingerprint`); features are stored in
    `shard-00000.safetensors`, `shard-00001.safetensors`, ... (tensor name = image key), each written to a
    temp file and linked into place, so a reader never sees a partial shard and two writers never overwrite
    each other's. The key index is read from the shards' headers at start; tensors are read lazily (mmap).
    """

    def __init__(
        self,
        root: str | Path,
        fingerprint: str = "",
        dtype: torch.dtype = torch.float32,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.shard_bytes = shard_bytes
        self.computed = 0  # images whose features this instance computed
        self._index: dict[str, Path] = {}  # image key -> shard file
        self._keys: dict[str, str] = {}  # resolved image source -> image key
        self._handles: dict[Path, Any] = {}
        self._pid = os.getpid()
        self.load_index()

    # ------------------------------------------------------------------------------------- index
    def load_index(self) -> int:
        """(Re)read the key index from the shard files; returns the number of cached images."""
        from safetensors import safe_open

        self._index.clear()
        self._handles.clear()
        for shard in sorted(self.root.glob(SHARD_GLOB)):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    keys = list(f.keys())
            except Exception as err:  # noqa: BLE001 - a damaged shard is skipped, its images recomputed
                log.warning("feature cache: ignoring unreadable shard %s (%s)", shard, err)
                continue
            for key in keys:
                self._index.setdefault(key, shard)
        return len(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    @property
    def shards(self) -> list[Path]:
        return sorted(self.root.glob(SHARD_GLOB))

    def key_for(self, dataset: VLMDataset, ref: str) -> str:
        """The content key of `dataset`'s image `ref` (hashed once per resolved source, then remembered)."""
        source = dataset.image_source(ref)
        name = ref if isinstance(source, bytes) else str(source)
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = image_key(source)
        return key

    # -------------------------------------------------------------------------------------- read
    def features(self, key: str) -> torch.Tensor:
        """Cached tower output of one image: [tiles, N, Dv] (the storage dtype)."""
        from safetensors import safe_open

        shard = self._index.get(key)
        if shard is None:
            raise KeyError(f"image {key[:12]}… is not in the feature cache {self.root}")
        if self._pid != os.getpid():  # forked (DataLoader worker): reopen the files in this process
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(shard), framework="pt")
        return handle.get_tensor(key)

    def source_for(self, dataset: VLMDataset) -> Callable[[str], torch.Tensor]:
        """ref -> cached features [tiles, N, Dv], for `VLMDataset.feature_source` (picklable: the dataset
        goes to data-loader workers with it)."""
        return _CachedFeatures(self, dataset)

    def attach(self, dataset: VLMDataset) -> None:
        """Make `dataset` yield `vision_features` from this cache instead of decoding images."""
        dataset.feature_source = self.source_for(dataset)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files are not picklable; reopened on first use
        return state

    # ----------------------------------------------------------------------------------- compute
    def missing(self, datasets: Iterable[VLMDataset]) -> list[tuple[str, VLMDataset, str, int]]:
        """(key, dataset, ref, tiles) of every distinct image of `datasets` not cached yet."""
        seen: set[str] = set()
        todo = []
        for dataset in datasets:
            for enc in dataset.encoded:
                for ref, tiles in zip(enc.images, enc.num_tiles):
                    key = self.key_for(dataset, ref)
                    if key not in seen and key not in self._index:
                        todo.append((key, dataset, ref, int(tiles)))
                    seen.add(key)
        return todo

    @torch.no_grad()
    def precompute(
        self,
        tower: nn.Module,
        datasets: Sequence[VLMDataset],
        batch_size: int = 64,
        device: torch.device | None = None,
    ) -> int:
        """Run `tower` (eval mode, no grad, batches of ~`batch_size` tiles) on every image of `datasets` that
        is not cached yet and store the features in new shards. Returns the number of images computed."""
        todo = self.missing(datasets)
        if not todo:
            log.info("feature cache %s: all %d images cached", self.root, len(self._index))
            return 0
        self.root.mkdir(parents=True, exist_ok=True)
        was_training = tower.training
        home = next(tower.parameters()).device
        device = device or home
        tower.eval().to(device)
        log.info("feature cache %s: computing %d images (%d cached)", self.root, len(todo), len(self._index))
        pending: dict[str, torch.Tensor] = {}
        pending_bytes, done, next_log = 0, 0, 0
        try:
            for start in range(0, len(todo), max(1, batch_size)):
                chunk = todo[start : start + max(1, batch_size)]
                pixels = [dataset.load_pixels(ref) for _, dataset, ref, _ in chunk]  # [tiles, 3, S, S]
                for (_, _, ref, tiles), p in zip(chunk, pixels):
                    if p.shape[0] != tiles:
                        raise RuntimeError(f"image {ref} gave {p.shape[0]} tiles, {tiles} at validation")
                feats = tower(torch.cat(pixels).to(device))  # [sum tiles, N, Dv]
                feats = feats.to("cpu", self.dtype)
                kill_point("feature_cache_batch")
                for (key, *_), part in zip(chunk, feats.split([p.shape[0] for p in pixels])):
                    pending[key] = part.contiguous()  # [tiles, N, Dv]
                    pending_bytes += part.numel() * part.element_size()
                    if pending_bytes >= self.shard_bytes:
                        self._write_shard(pending)
                        pending, pending_bytes = {}, 0
                done += len(chunk)
                if done >= next_log or done == len(todo):
                    log.info("feature cache: %d/%d images", done, len(todo))
                    next_log = done + max(1, len(todo) // 10)
            if pending:
                self._write_shard(pending)
        finally:
            tower.to(home).train(was_training)
        self.computed += len(todo)
        return len(todo)

    def _write_shard(self, tensors: dict[str, torch.Tensor]) -> Path:
        """Write one shard atomically: a temp file (fsynced), then linked to the first free shard name."""
        from safetensors.torch import save_file

        tmp = self.root / f".shard.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        save_file(
            tensors, str(tmp), metadata={"format": str(FORMAT_VERSION), "fingerprint": self.fingerprint}
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        number = len(self.shards)
        try:
            while True:
                final = self.root / f"shard-{number:05d}.safetensors"
                try:
                    os.link(tmp, final)  # fails if the name is taken: never overwrites another writer's shard
                    break
                except FileExistsError:
                    number += 1
        finally:
            tmp.unlink(missing_ok=True)
        kill_point("feature_cache_shard")
        for key in tensors:
            self._index.setdefault(key, final)
        log.debug("feature cache: wrote %s (%d images)", final, len(tensors))
        return final

    # ---------------------------------------------------------------------------------- batches
    def replace_pixels(self, batch: dict[str, Any], items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Check a collated batch of cache-backed items and drop its (empty) pixels.

        The items carry `vision_features` [tiles, N, Dv] (see `attach`), which `Collator` / `PackingCollator`
        concatenate in the order they concatenate pixel rows (packed order when packing), so the batch's
        `vision_features` [I, N, Dv] lines up with its placeholders and `image_counts`.
        """
        if any(it.get("pixel_values") is not None for it in items):
            raise RuntimeError("feature cache active but the items hold decoded pixels: dataset not attached")
        out = {k: v for k, v in batch.items() if k != "pixel_values"}
        feats = out.get("vision_features")
        rows = 0 if feats is None else int(feats.shape[0])
        expected = sum(batch.get("image_counts") or [])
        if rows != expected:
            raise RuntimeError(f"feature cache: batch has {rows} feature rows for {expected} image rows")
        return out


class _CachedFeatures:
    """`FeatureCache.source_for`'s lookup as an object, not a closure, so that it pickles."""

    def __init__(self, cache: FeatureCache, dataset: VLMDataset) -> None:
        self.cache, self.dataset = cache, dataset

    def __call__(self, ref: str) -> torch.Tensor:
        return self.cache.features(self.cache.key_for(self.dataset, ref))


# ------------------------------------------------------------------------------------------------ stages
def _augmented(datasets: Sequence[VLMDataset], data_cfg: DataConfig) -> str | None:
    """Why images are not the same every time they are read (None: deterministic)."""
    for name in ("augment", "augmentation", "augmentations"):
        if getattr(data_cfg, name, None):
            return f"data.{name} is set"
        for dataset in datasets:
            if getattr(dataset.images, name, None):
                return f"the dataset's image settings have {name}"
    return None


def _stochastic(tower: nn.Module) -> str | None:
    """A tower whose training-mode output is random (dropout): cached eval features would differ."""
    for name, module in tower.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return f"dropout {module.p} at vision.{name}"
    for hf in hf_configs(tower):
        for key, value in hf.items():
            stochastic = "dropout" in key or "drop_path" in key
            if stochastic and isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                return f"HF config {key}={value}"
    return None


def maybe_feature_cache(
    model: nn.Module,
    data: Any,
    run_dir: str | Path,
    data_cfg: DataConfig,
    *,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 64,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    barrier: Callable[[], None] | None = None,
) -> FeatureCache | None:
    """A `FeatureCache` for `data` (a `StageData`) with every train/val image precomputed, or None.

    Active only when no parameter of `model.vision` requires grad (the stage is applied first), the images are
    not augmented and the tower has no dropout. Location: `<cache_dir>/<tower fingerprint>/`, `cache_dir`
    defaulting to `RUN_DIR/feature_cache`; point several runs at one `cache_dir` to share features (keys are
    image content hashes, the fingerprint covers tower config + weights + preprocessing, so nothing stale is
    reused). `dtype=torch.float16` halves the disk use; float32 (default) gives exactly the uncached features.
    Rank 0 computes, the others wait at `barrier` and read the shards. The datasets are switched to read
    features instead of decoding images.
    """
    trainable = [n for n, p in model.vision.named_parameters() if p.requires_grad]
    datasets = [d for d in (data.train, data.val) if d is not None]
    reason = (
        f"the vision tower trains ({len(trainable)} tensors)"
        if trainable
        else _augmented(datasets, data_cfg) or _stochastic(model.vision)
    )
    if reason is None and not any(enc.images for d in datasets for enc in d.encoded):
        reason = "the data has no images"
    if reason is not None:
        log.info("feature cache off: %s", reason)
        return None
    fingerprint, desc = tower_fingerprint(model, data.train.images, dtype)
    for other in datasets[1:]:
        if preprocessing(other.images) != desc["preprocessing"]:
            raise ValueError("feature cache: train and val images are preprocessed differently")
    root = Path(cache_dir) if cache_dir is not None else Path(run_dir) / CACHE_DIRNAME
    cache = FeatureCache(root / fingerprint[:24], fingerprint, dtype, shard_bytes)
    if getattr(data, "rank", 0) == 0:
        _write_description(cache.root, fingerprint, desc)
        cache.precompute(model.vision, datasets, batch_size, getattr(data, "device", None))
    if barrier is not None:
        barrier()
        cache.load_index()
    missing = cache.missing(datasets)
    if missing:
        raise RuntimeError(
            f"feature cache {cache.root}: {len(missing)} images still missing after precompute"
        )
    for dataset in datasets:
        cache.attach(dataset)
    log.info("feature cache %s: %d images (%d computed now)", cache.root, len(cache), cache.computed)
    return cache


def _write_description(root: Path, fingerprint: str, desc: dict[str, Any]) -> None:
    """`fingerprint.json`: what the directory's features depend on (for people; the name is the check)."""
    path = root / FINGERPRINT_NAME
    if path.is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{FINGERPRINT_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"fingerprint": fingerprint, **desc}, indent=2, default=str))
    os.replace(tmp, path)
