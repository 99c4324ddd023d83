"""Contrastive ViT pretraining: loss goes down, weights round-trip into SmallViT, word order matters, CLI."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from vlmkit.config import VisionConfig
from vlmkit.models.vision import SmallViT, ViTConfig
from vlmkit.train.pretrain_vision import (
    PretrainVisionConfig,
    TextEncoderConfig,
    build_model,
    contrastive_loss,
    dense_targets,
    load_pairs,
    load_pretrained,
    load_vision_config,
    pretrain_vision,
    probe,
    save_pretrained,
    train_contrastive,
)

TINY_VISION = VisionConfig.make("vit", image_size=32, vit=ViTConfig(dim=32, depth=2, heads=2, patch_size=8))


def _cfg(data: str, **kw) -> PretrainVisionConfig:
    base = PretrainVisionConfig(
        data=data,
        vision=TINY_VISION,
        text=TextEncoderConfig(dim=32, depth=1, heads=2, max_len=32),
        embed_dim=32,
        batch_size=16,
        lr=3e-3,
        max_seconds=0,
        steps=25,
        hard_negatives=2,
        log_every=0,
        threads=2,
    )
    return replace(base, **kw)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, str]:
    from vlmkit.shapesworld.world import generate_shapesworld

    out = tmp_path_factory.mktemp("shapes")
    paths = generate_shapesworld(out, 0, seed=3, image_size=32, splits={"train": 48, "val": 16})
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def train_data(shapes):
    return load_pairs(shapes["train"], TINY_VISION)


def _fixed_batch_loss(model, sampler, n: int = 16) -> float:
    rng = random.Random(123)
    positives, negatives = [], []
    for i in range(n):
        p, neg = sampler.sample(i, 2, rng, form="caption")
        positives.append(p)
        negatives += neg
    texts = positives + negatives
    ids = {t: k for k, t in enumerate(dict.fromkeys(texts))}
    with torch.no_grad():
        image_emb, _ = model.encode_images(sampler.data.pixels[:n])
        loss, _ = contrastive_loss(
            image_emb,
            model.encode_texts(texts),
            torch.tensor([ids[t] for t in texts]),
            model.logit_scale.exp(),
        )
    return loss.item()


def test_load_pairs_reads_one_caption_per_scene(train_data):
    assert len(train_data) == 48
    assert train_data.pixels.shape == (48, 3, 32, 32)
    assert all(c.endswith(".") for c in train_data.captions)
    assert all(o and {"color", "shape", "box"} <= o[0].keys() for o in train_data.objects)


@pytest.fixture(scope="module")
def trained(shapes, train_data):
    """A tiny model before/after 30 steps: (model, sampler, loss before, loss after, metrics)."""
    cfg = _cfg(shapes["train"], steps=30)
    torch.manual_seed(0)
    model, sampler = build_model(cfg, train_data)
    before = _fixed_batch_loss(model.eval(), sampler)
    metrics = train_contrastive(cfg, model, sampler, train_data)
    return model, sampler, before, _fixed_batch_loss(model, sampler), metrics


def test_training_reduces_contrastive_loss(trained):
    _, _, before, after, metrics = trained
    assert metrics["steps"] == 30
    assert after < before - 0.3, (before, after)


def test_saved_weights_load_into_smallvit(tmp_path, shapes, train_data):
    cfg = _cfg(shapes["train"], steps=3)
    torch.manual_seed(0)
    model, sampler = build_model(cfg, train_data)
    train_contrastive(cfg, model, sampler, train_data)
    out = save_pretrained(model, tmp_path / "pre")
    pixels = train_data.pixels[:4]
    with torch.no_grad():
        expected = model.tower(pixels)  # [4, 16, 32]
        tower = SmallViT(replace(TINY_VISION, path=str(out))).eval()
        assert torch.equal(tower(pixels), expected)
        assert torch.equal(SmallViT(load_vision_config(out)).eval()(pixels), expected)
        fresh = SmallViT(TINY_VISION).eval()
        assert not torch.allclose(fresh(pixels), expected)
        reloaded = load_pretrained(out)
        texts = ["a red circle.", "a blue square and a green star."]
        assert torch.allclose(reloaded.encode_texts(texts), model.encode_texts(texts))


def test_text_encoder_sees_word_order(trained):
    model = trained[0]
    a, b = "a red circle and a blue square.", "a blue circle and a red square."
    ids = model.tokenizer.encode([a, b], 32)
    assert ids[0].sort().values.tolist() == ids[1].sort().values.tolist()  # the same bag of words
    with torch.no_grad():
        emb = model.encode_texts([a, b])
        assert not torch.allclose(emb[0], emb[1], atol=1e-4)  # word order changes the embedding
        saved = model.text.pos.detach().clone()
        model.text.pos.zero_()  # without positions the encoder is a bag of words: the test would fail
        try:
            same = model.encode_texts([a, b])
        finally:
            model.text.pos.copy_(saved)
    assert torch.allclose(same[0], same[1], atol=1e-5)


def test_contrastive_loss_treats_duplicate_texts_as_positives():
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    ids = torch.tensor([0, 0, 1])  # images 0 and 1 share a caption
    loss, acc = contrastive_loss(emb, emb, ids, torch.tensor(50.0))
    assert acc.item() == 1.0
    # rows 0 and 1: two equal positives -> log 2 each; row 2: one clear positive -> ~0; the mean over 3 rows
    assert loss.item() == pytest.approx(2 / 3 * torch.log(torch.tensor(2.0)).item(), abs=1e-3)


def test_encode_images_matches_tower_and_detach_cuts_gradient(trained, train_data):
    model = trained[0]
    pixels = train_data.pixels[:3]
    with torch.no_grad():
        emb, patches = model.encode_images(pixels)
        assert torch.allclose(patches, model.tower(pixels), atol=1e-5)
        pooled = torch.nn.functional.normalize(model.image_proj(model.tower.pooled(pixels)), dim=-1)
        assert torch.allclose(emb, pooled, atol=1e-5)
    model.zero_grad(set_to_none=True)
    model.encode_images(pixels, detach=True)[0].sum().backward()
    assert model.tower.patch_embed.weight.grad is None  # below select_layer: no gradient from the embedding
    assert model.tower.blocks[-1].mlp[0].weight.grad is not None  # the block above it still trains
    model.zero_grad(set_to_none=True)


def test_mirrored_scene_reverses_caption_and_labels():
    from vlmkit.train.pretrain_vision import PairData, TextSampler, mirror

    objects = [
        {"color": "red", "shape": "circle", "box": (0.0, 0.0, 8.0, 8.0)},
        {"color": "blue", "shape": "square", "box": (20.0, 20.0, 30.0, 30.0)},
    ]
    assert mirror(objects, 32)[0]["box"] == (24.0, 0.0, 32.0, 8.0)
    data = PairData(torch.zeros(1, 3, 32, 32), ["a red circle and a blue square."], [objects], ["x.png"])
    sampler = TextSampler(data, 32, False, ["blue", "red"], ["circle", "square"])
    rng = random.Random(0)
    assert sampler.sample(0, 0, rng)[0] == "a red circle and a blue square."
    assert sampler.sample(0, 0, rng, flipped=True)[0] == "a blue square and a red circle."
    sampler.forms = True
    assert sampler.sample(0, 0, rng, form="position", flipped=True)[0] == (
        "a blue square at the bottom left and a red circle at the top right."
    )


def test_dense_targets_label_patches_under_boxes():
    objects = [{"color": "blue", "shape": "square", "box": (0.0, 0.0, 16.0, 16.0)}]
    groups = {"color": ["blue", "red"], "shape": ["circle", "square"]}
    labels, box, on = dense_targets(objects, 32, 4, groups)
    grid = labels[0].view(4, 4)
    assert grid[:2, :2].eq(1).all() and grid[2:].eq(0).all() and grid[:, 2:].eq(0).all()
    assert labels[1].view(4, 4)[:2, :2].eq(2).all()
    assert on.view(4, 4)[:2, :2].all() and on.sum() == 4
    assert torch.allclose(box[0], torch.tensor([0.0, 0.0, 0.5, 0.5]))


def test_detection_objective_on_any_object_labels(tmp_path):
    """Records whose objects carry other labels (here a COCO-style `label`) train a detection head too."""
    from PIL import Image

    from vlmkit.models.detection import DetectionHead, head_groups

    records = []
    for i in range(8):
        Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / f"{i}.png")
        box = [0, 0, 16, 16] if i % 2 else [16, 16, 32, 32]
        obj = {"label": "dog" if i % 2 else "cat", "box": box}
        records.append({"caption": "an animal", "image": f"{i}.png", "meta": {"objects": [obj]}})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = PretrainVisionConfig(
        data=str(data), vision=TINY_VISION, steps=3, max_seconds=0, batch_size=4, contrastive_weight=0,
        label_groups={"label": []}, threads=1,
    )  # fmt: skip
    out = pretrain_vision(cfg, tmp_path / "out", progress=False)
    assert head_groups(out) == {"label": ["cat", "dog"]}
    head = DetectionHead(TINY_VISION.vit.dim, {"label": ["cat", "dog"]})
    head.load(out)
    saved = load_pretrained(out).detector
    assert torch.equal(head.dense[1].weight, saved.dense[1].weight)


def test_probe_reports_accuracies(shapes, train_data):
    torch.manual_seed(0)
    model, _ = build_model(_cfg(shapes["train"]), train_data)
    val = load_pairs(shapes["val"], TINY_VISION)
    res = probe(model.eval(), train_data, val)
    assert set(res) >= {"color_at_object", "shape_at_object", "box_iou50", "count", "retrieval_color_swap"}
    assert all(0.0 <= v <= 1.0 for v in res.values())
    assert res["color_at_object"] > 0.5  # color is linearly readable even from a random patch embedding


def test_cli_writes_files(tmp_path, shapes):
    from vlmkit.cli import main

    out = tmp_path / "cli"
    code = main(
        [
            "pretrain-vision",
            shapes["train"],
            "--out",
            str(out),
            "--steps",
            "2",
            "--no-progress",
            "--set",
            "image_size=32",
            "vit.dim=32",
            "vit.depth=1",
            "vit.heads=2",
            "text.dim=32",
            "text.depth=1",
            "embed_dim=32",
            "batch_size=8",
        ]
    )
    assert code == 0
    for name in ("vision.safetensors", "text_encoder.safetensors", "vision_config.json", "metrics.json"):
        assert (out / name).is_file(), name
    vision = json.loads((out / "vision_config.json").read_text())
    assert vision["vit"]["dim"] == 32 and vision["image_size"] == 32
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    SmallViT(load_vision_config(out))  # loads without a shape mismatch


def test_pretrain_vision_end_to_end(tmp_path, shapes):
    out = pretrain_vision(_cfg(shapes["train"], steps=2), tmp_path / "e2e", progress=False)
    assert (out / "vision.safetensors").is_file()
    assert load_vision_config(out).path == str(out.resolve())


@pytest.mark.parametrize("contrastive_weight", [1.0, 0.0])
def test_progress_lines_show_only_the_losses_that_train(tmp_path, shapes, caplog, contrastive_weight):
    import logging

    cfg = _cfg(shapes["train"], steps=2, log_every=1, contrastive_weight=contrastive_weight)
    with caplog.at_level(logging.INFO, logger="vlmkit"):
        pretrain_vision(cfg, tmp_path / "out", progress=False)
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(steps) == 2
    assert all(("in-batch acc" in m) == (contrastive_weight > 0) for m in steps), steps
    assert all("dense" in m for m in steps)


@pytest.mark.parametrize("contrastive", [True, False])
def test_progress_bar_shows_only_the_losses_that_train(shapes, train_data, contrastive):
    import io

    from rich.console import Console

    from vlmkit.progress import progress_bar
    from vlmkit.train.pretrain_vision import VisionPretrain

    objective = VisionPretrain(_cfg(shapes["train"], contrastive_weight=float(contrastive)), train_data)
    bar = progress_bar(*objective.fields)  # the shared loop's bar with the objective's numbers
    bar.add_task("pretrain", total=10, completed=7, loss=0.5, acc=0.25, dense=0.125)
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(bar.make_tasks_table(bar.tasks))
    text = console.export_text()
    assert "7/10" in text and "dense 0.125" in text
    assert ("loss 0.500" in text and "acc 0.25" in text) == contrastive, text


def test_vision_config_written_before_per_kind_configs_still_loads(tmp_path):
    """A pretrain-vision directory from before each tower kind had its own config (its vision_config.json
    holds every tower's keys, e.g. `hf_config`, `towers`) loads as the `vit` config it describes."""
    old = {
        "kind": "vit", "path": None, "hf_config": None, "select_layer": -1, "drop_prefix_tokens": True,
        "image_size": 32, "resolution": None, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "vit": {"dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 4.0, "patch_size": 8, "cls_token": True},
        "towers": [],
    }  # fmt: skip
    (tmp_path / "vision_config.json").write_text(json.dumps(old))
    cfg = load_vision_config(tmp_path)
    assert cfg.kind == "vit" and cfg.vit.dim == 32 and cfg.select_layer == -1
    assert cfg.path == str(tmp_path.resolve())
