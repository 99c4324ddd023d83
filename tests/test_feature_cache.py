"""Frozen-tower feature cache: exact equivalence, reuse across epochs/stages, invalidation, shards, the CLI."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vlmkit.cli import main
from vlmkit.config import DataConfig, StageConfig
from vlmkit.data.collate import Collator, PackingCollator, first_fit
from vlmkit.data.dataset import VLMDataset
from vlmkit.data.processor import ImageProcessor
from vlmkit.models.vision import SmallViT
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.shapesworld.world import generate_shapesworld
from vlmkit.train.data import StageData
from vlmkit.train.feature_cache import FeatureCache, image_key, maybe_feature_cache, tower_fingerprint
from vlmkit.train.metrics import read_metrics
from vlmkit.train.stages import apply_stage

from conftest import tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """ShapesWorld train/val + `mixed.json`: its train records plus two-image, text-only and data-URL ones."""
    out = tmp_path_factory.mktemp("shapes")
    files = generate_shapesworld(
        out, 12, seed=0, image_size=32, tasks=("caption", "counting"), splits={"train": 12, "val": 4}
    )
    records = json.loads(files["train"].read_text())
    url = "data:image/png;base64," + base64.b64encode((out / "images/val-000000.png").read_bytes()).decode()
    turn = [
        {"from": "human", "value": "<image>\n<image>\nSame?"},
        {"from": "gpt", "value": "No, they differ."},
    ]
    records += [
        {"id": "two", "image": ["images/train-000003.png", "images/train-000001.png"], "conversations": turn},
        {
            "id": "text",
            "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}],
        },
        {
            "id": "url",
            "image": url,
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}] + turn[1:],
        },
    ]
    (out / "mixed.json").write_text(json.dumps(records))
    return out


def _model(**vision) -> VisionLanguageModel:
    torch.manual_seed(0)
    cfg = tiny_model_config()
    for name, value in vision.items():
        setattr(cfg.vision, name, value)
    model = VisionLanguageModel.from_config(cfg).train()
    apply_stage(model, StageConfig(preset="align"))  # tower frozen, bridge trains
    return model


def _data(
    model: VisionLanguageModel, root: Path, cfg: DataConfig, train: str = "train.json", resize: str = "resize"
) -> StageData:
    pad = model.tokenizer.pad_token_id
    collate = PackingCollator(pad, cfg.max_length) if cfg.packing else Collator(pad, "right")
    processor = model.processor.replace(resize=resize)
    train_set = VLMDataset.from_config(cfg, root / train, processor)
    val_set = VLMDataset.from_config(cfg, root / "val.json", processor)
    return StageData(train_set, val_set, collate, batch_size=6, seed=0, group_by_length=False)


def _loss_and_grads(model: VisionLanguageModel, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class _CountTower:
    """Counts SmallViT forward calls and the image rows they saw (patched on the class: survives reloads)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls, self.rows = 0, 0
        original = SmallViT.forward

        def counting(tower: SmallViT, pixels: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            self.rows += int(pixels.shape[0])
            return original(tower, pixels)

        monkeypatch.setattr(SmallViT, "forward", counting)


def _reorders(lengths: list[int], capacity: int) -> bool:
    """Whether first-fit packing puts these items in another order than given."""
    return [i for b in first_fit(lengths, capacity) for i in b] != list(range(len(lengths)))


# -------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize(
    "packing,resize", [(False, "resize"), (True, "resize"), (True, "anyres")], ids=["pad", "pack", "anyres"]
)
def test_cached_step_equals_uncached_step(shapes, tmp_path, monkeypatch, packing, resize):
    model = _model()
    cfg = DataConfig(max_length=400, packing=packing)
    plain = _data(model, shapes, cfg, "mixed.json", resize)
    cached = _data(model, shapes, cfg, "mixed.json", resize)
    cache = maybe_feature_cache(model, cached, tmp_path, cfg)
    assert cache is not None and cached.train.feature_source is not None
    cached.feature_cache = cache
    if resize == "anyres":
        assert max(t for e in cached.train.encoded for t in e.num_tiles) > 1  # [tiles, N, Dv] per image
    special = [
        next(i for i, e in enumerate(cached.train.encoded) if e.id == x) for x in ("two", "text", "url")
    ]
    batches = [[*special, 0, 5, 9], cached.epoch_order(0)[:6]]  # two-image, text-only, data-URL samples
    for indices in batches:
        with monkeypatch.context() as m:
            m.setattr(ImageProcessor, "open", lambda *a: pytest.fail("a cached item decoded an image"))
            batch = cached._collate([cached.train[i] for i in indices])
        ref = plain._collate([plain.train[i] for i in indices])
        assert "pixel_values" not in batch and batch["vision_features"].shape[1:] == (16, 32)  # [I, N, Dv]
        assert ref["pixel_values"] is not None and "vision_features" not in ref
        assert batch["image_counts"] == ref["image_counts"]
        loss, grads = _loss_and_grads(model, batch)
        ref_loss, ref_grads = _loss_and_grads(model, ref)
        assert loss == pytest.approx(ref_loss, abs=1e-6)
        assert grads.keys() == ref_grads.keys() and any(n.startswith("bridge") for n in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=0, msg=name)
    val = cached.val_batches()  # validation batches come from the cache as well
    assert val and all("pixel_values" not in b for b in val)


def test_cached_rows_follow_the_packed_order(shapes, tmp_path):
    """Shuffled features would still give a finite loss: check every image's rows against the tower."""
    model = _model()
    cfg = DataConfig(max_length=128, packing=True)
    data = _data(model, shapes, cfg)
    data.feature_cache = maybe_feature_cache(model, data, tmp_path, cfg)
    lengths = data.train.lengths
    by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    a, b, c = by_length[0], by_length[1], by_length[-1]  # a + c fit in a row, a + b do not
    data.collate = PackingCollator(model.tokenizer.pad_token_id, lengths[a] + lengths[c])
    picked = [a, b, c, *by_length[2:5]]
    assert _reorders([lengths[i] for i in picked], lengths[a] + lengths[c])
    items = [data.train[i] for i in picked]
    batch = data._collate(items)
    assert batch["vision_features"].shape[0] == 6  # [I, N, Dv]
    packed = [i for row in batch["sample_ids"] for i in row.split("+")]
    assert sorted(packed) == sorted(it["id"] for it in items) and packed != [it["id"] for it in items]
    plain = VLMDataset.from_config(cfg, shapes / "train.json", model.processor)
    with torch.no_grad():
        model.vision.eval()
        for row, sample_id in enumerate(packed):
            pixels = plain[next(i for i, e in enumerate(plain.encoded) if e.id == sample_id)]["pixel_values"]
            torch.testing.assert_close(
                batch["vision_features"][row], model.vision(pixels)[0], atol=1e-6, rtol=0
            )


# ------------------------------------------------------------------------------------------------ reuse
def test_second_build_reuses_the_shards(shapes, tmp_path, monkeypatch):
    model = _model()
    cfg = DataConfig(max_length=128)
    counter = _CountTower(monkeypatch)
    data = _data(model, shapes, cfg)
    first = maybe_feature_cache(model, data, tmp_path, cfg)
    assert first.computed == len(first) == 16 and counter.rows == 16  # 12 train + 4 val scenes, once each
    shards = {p: p.stat().st_mtime_ns for p in first.shards}
    assert [p.name for p in shards] == ["shard-00000.safetensors"]
    keys = {first.key_for(d, r) for d in (data.train, data.val) for e in d.encoded for r in e.images}
    with safe_open(str(first.shards[0]), framework="pt") as f:  # the key index lives in the shard files
        assert set(f.keys()) == keys and f.metadata()["fingerprint"] == first.fingerprint
    calls = counter.calls
    second = maybe_feature_cache(model, _data(model, shapes, cfg), tmp_path, cfg)  # next stage, same tower
    assert second.root == first.root and second.computed == 0 and counter.calls == calls
    assert {p: p.stat().st_mtime_ns for p in second.shards} == shards
    data = _data(model, shapes, cfg)
    data.feature_cache = maybe_feature_cache(model, data, tmp_path, cfg)
    for epoch in range(2):  # whole epochs: no tower call at all
        for pos in range(data.steps_per_epoch):
            data.next_batch(epoch, pos)
    assert counter.calls == calls


def test_saved_and_reloaded_tower_keeps_its_fingerprint(shapes, tmp_path):
    """Stage 2 starts from stage 1's saved model: same tower, same fingerprint (so the shards are reused)."""
    model = _model()
    images = _data(model, shapes, DataConfig()).train.images
    model.save_pretrained(tmp_path / "m")
    again = VisionLanguageModel.from_pretrained(tmp_path / "m")
    again_images = VLMDataset.from_config(DataConfig(), shapes / "val.json", again.processor).images
    assert tower_fingerprint(again, again_images)[0] == tower_fingerprint(model, images)[0]


# -------------------------------------------------------------------------------------------- invalidation
def test_tower_or_preprocessing_changes_change_the_fingerprint(shapes):
    cfg = DataConfig()
    model = _model()
    base, desc = tower_fingerprint(model, _data(model, shapes, cfg).train.images)
    assert len(base) == 64 and desc["preprocessing"]["image_size"] == 32
    changed = {}
    for name, vision in {"select_layer": {"select_layer": -1}, "image_size": {"image_size": 64}}.items():
        other = _model(**vision)
        changed[name] = tower_fingerprint(other, _data(other, shapes, cfg).train.images)[0]
    with torch.no_grad():
        model.vision.pos.add_(1e-4)
    changed["weights"] = tower_fingerprint(model, _data(model, shapes, cfg).train.images)[0]
    changed["resize"] = tower_fingerprint(model, _data(model, shapes, cfg, resize="pad").train.images)[0]
    changed["fp16"] = tower_fingerprint(model, _data(model, shapes, cfg).train.images, torch.float16)[0]
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed


def test_changed_tower_recomputes_in_its_own_directory(shapes, tmp_path, monkeypatch):
    cfg = DataConfig()
    model = _model()
    first = maybe_feature_cache(model, _data(model, shapes, cfg), tmp_path, cfg)
    with torch.no_grad():
        model.vision.blocks[0].mlp[0].weight.mul_(1.01)
    counter = _CountTower(monkeypatch)
    second = maybe_feature_cache(model, _data(model, shapes, cfg), tmp_path, cfg)
    assert second.root.parent == first.root.parent and second.root != first.root
    assert second.computed == 16 and counter.rows == 16
    key = next(iter(second._index))
    assert not torch.equal(second.features(key), first.features(key))


def test_changed_image_bytes_get_a_new_key(shapes, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shapes, root)
    cfg = DataConfig()
    model = _model()
    cache_dir = tmp_path / "shared"  # a cache directory outside the run directory
    first = maybe_feature_cache(model, _data(model, root, cfg), tmp_path / "run1", cfg, cache_dir=cache_dir)
    path = root / "images/train-000002.png"
    old_key = image_key(path)
    img = Image.open(path).convert("RGB")
    img.putpixel((0, 0), (1, 2, 3))
    img.save(path)
    assert image_key(path) != old_key
    counter = _CountTower(monkeypatch)
    data = _data(model, root, cfg)
    second = maybe_feature_cache(model, data, tmp_path / "run2", cfg, cache_dir=cache_dir)
    assert second.root == first.root and second.computed == 1 and counter.rows == 1
    assert len(second) == 17 and old_key in second and image_key(path) in second
    index = next(i for i, e in enumerate(data.train.encoded) if e.images[0].endswith("train-000002.png"))
    with torch.no_grad():
        model.vision.eval()
        want = model.vision(data.train.images.tensors(img))  # [1, N, Dv]
    torch.testing.assert_close(data.train[index]["vision_features"], want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ when it is off
def test_trainable_or_stochastic_tower_disables_the_cache(shapes, tmp_path):
    cfg = DataConfig()
    model = _model()
    apply_stage(model, StageConfig(preset="align", train_tower=True))
    data = _data(model, shapes, cfg)
    assert maybe_feature_cache(model, data, tmp_path, cfg) is None
    assert data.train.feature_source is None and data.train[0]["pixel_values"] is not None
    assert not (tmp_path / "feature_cache").exists()
    model = _model()
    model.vision.drop = torch.nn.Dropout(0.1)  # training-mode features would be random
    assert maybe_feature_cache(model, _data(model, shapes, cfg), tmp_path, cfg) is None
    model = _model()
    assert maybe_feature_cache(model, _data(model, shapes, cfg), tmp_path, cfg) is not None


# ------------------------------------------------------------------------------------------------ shards
def test_shards_are_size_bounded_atomic_and_reloadable(shapes, tmp_path):
    cfg = DataConfig()
    model = _model()
    data = _data(model, shapes, cfg)
    per_image = 16 * 32 * 2  # [1, 16, 32] float16
    cache = maybe_feature_cache(model, data, tmp_path, cfg, dtype=torch.float16, shard_bytes=5 * per_image)
    names = [p.name for p in cache.shards]
    assert names == [f"shard-{i:05d}.safetensors" for i in range(len(names))] and len(names) >= 3
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".")]  # no temp files left
    assert json.loads((cache.root / "fingerprint.json").read_text())["fingerprint"] == cache.fingerprint
    (cache.root / ".shard.tmp-1-dead").write_bytes(b"half a shard")  # a crashed writer's leftover
    reopened = FeatureCache(cache.root, cache.fingerprint, torch.float16)
    assert len(reopened) == len(cache) == 16
    key = next(iter(cache._index))
    feats = reopened.features(key)
    assert feats.dtype == torch.float16 and feats.shape == (1, 16, 32)
    fp32 = maybe_feature_cache(model, _data(model, shapes, cfg), tmp_path, cfg)
    assert fp32.root != cache.root
    torch.testing.assert_close(feats.float(), fp32.features(key), atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------------------------ the CLI
def _losses(run: Path) -> list[tuple[int, str, float]]:
    rows = read_metrics(run / "metrics.jsonl")
    return [(r["step"], "loss" if "loss" in r else "val", r.get("loss", r.get("val_loss"))) for r in rows]


def test_cli_train_with_the_cache_matches_the_uncached_run(tmp_path, monkeypatch):
    # the tiny recipe, shortened: 16 caption samples (2 steps an epoch) so stage 1 runs into a second epoch
    common = [
        "train.plot=false",
        "train.save_every=0",
        "data.synthetic.n_train=16",
        "data.synthetic.n_val=4",
        "stages.0.max_steps=3",
        "stages.1.max_steps=1",
    ]
    counter = _CountTower(monkeypatch)
    cached, plain = tmp_path / "cached", tmp_path / "plain"
    assert main(["train", TINY, "--out", str(cached), "--set", "train.feature_cache=true", *common]) == 0
    cached_rows = counter.rows
    assert main(["train", TINY, "--out", str(plain), "--set", *common]) == 0
    got, want = _losses(cached), _losses(plain)
    assert [g[:2] for g in got] == [w[:2] for w in want] and len(got) == 4 + 2  # steps + a val pass per stage
    for (step, kind, a), (_, _, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5), (step, kind)
    # two stages, two epochs in stage 1: every train/val image went through the tower exactly once
    (fp_dir,) = (cached / "feature_cache").iterdir()
    with safe_open(str(fp_dir / "shard-00000.safetensors"), framework="pt") as f:
        assert cached_rows == len(f.keys()) == 16 + 4
    assert counter.rows - cached_rows >= 4 * 8  # uncached: the tower runs on every step's images
