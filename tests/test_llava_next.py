"""LLaVA-NeXT's AnyRes layout (`processor.anyres_layout: llava_next`): the tile grid's token map unpadded to the
image, a learned `image_newline` after each row, token counts from the image size (issue 15, item 3)."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.config import BridgeConfig, DataConfig, FusionConfig, ProcessorConfig
from vlmkit.data.collate import Collator, PackingCollator, model_inputs
from vlmkit.data.dataset import VLMDataset
from vlmkit.data.images import anyres_layout
from vlmkit.data.processor import ImageTokenMismatchError, Processor, VisionGeometry
from vlmkit.infer.generate import Predictor
from vlmkit.models.tiny_tokenizer import build_tiny_tokenizer
from vlmkit.models.vlm import VisionLanguageModel

from conftest import random_image, tiny_model_config

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # (width, height), llava-v1.6
SIZES = [(800, 600), (1000, 250), (250, 1000), (336, 336), (1920, 1080), (37, 500), (640, 641)]
TINY = ProcessorConfig(
    resize="anyres", anyres_grid=[[64, 32], [32, 64], [64, 64]], anyres_layout="llava_next"
)


def _next_processor(layout: str = "llava_next") -> Processor:
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    cfg = ProcessorConfig(resize="anyres", anyres_grid=NEXT_PINPOINTS, anyres_layout=layout)
    return Processor(
        cfg, tok, VisionGeometry(336, tokens_per_tile=576)
    )  # CLIP ViT-L/14-336: 24 x 24 per tile


def test_unpadded_grid_geometry_by_hand():
    layout = anyres_layout((800, 600), [tuple(p) for p in NEXT_PINPOINTS], 336)
    assert (layout.cols, layout.rows) == (2, 2)
    # 48 x 48 cells; the image fills 48 x 36 of them: 6 padding rows cut above and below
    assert layout.unpadded_cells(24) == (6, 0, 36, 48)
    assert layout.llava_next_tokens(24) == 576 + 36 * 49
    tall = anyres_layout((250, 1000), [tuple(p) for p in NEXT_PINPOINTS], 336)
    assert (tall.cols, tall.rows) == (1, 3) and tall.unpadded_cells(24) == (0, 3, 72, 18)


def test_token_counts_equal_transformers_llava_next_processor():
    """For several image sizes, vlmkit's placeholder count (from the size alone, no model) equals the count
    transformers' LlavaNextProcessor writes for a llava-v1.6 geometry (CLIP-L/336, official pinpoints)."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    ours = _next_processor()
    hf = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=[[h, w] for w, h in NEXT_PINPOINTS],
        ),
        tokenizer=ours.tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    counts = []
    for k, size in enumerate(SIZES):
        enc = hf(images=[random_image(k, size)], text=["<image>"], return_tensors="pt")
        theirs = int((enc["input_ids"][0] == ours.image_token_id).sum())
        mine = ours.image_tokens(ours.images.layout(size))
        assert mine == theirs, size
        assert ours.prompt_length([{"role": "user", "content": "<image>"}], [size]) > mine
        counts.append(mine)
    assert len(set(counts)) >= 5  # the count depends on the size (plain tiles: only 3 values here)
    plain = _next_processor("tiles")
    assert {plain.image_tokens(plain.images.layout(s)) for s in SIZES} <= {3 * 576, 4 * 576, 5 * 576}


@pytest.fixture(scope="module")
def next_model():
    torch.manual_seed(0)
    cfg = tiny_model_config(processor=TINY)
    model = VisionLanguageModel.from_config(cfg).eval()
    assert model.llava_next and tuple(model.bridge.image_newline.shape) == (model.llm.hidden_size,)
    return model


def _records(tmp_path, sizes):
    records = []
    for k, size in enumerate(sizes):
        random_image(k, size).save(tmp_path / f"{k}.png")
        records.append(
            {
                "id": f"s{k}",
                "image": f"{k}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is it?"},
                    {"from": "gpt", "value": f"Pattern {k}."},
                ],
            }
        )
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path / "data.json"


def test_training_batches_follow_each_image_size_and_train_the_newline(next_model, tmp_path):
    sizes = [(50, 30), (30, 70), (90, 80)]
    dataset = VLMDataset.from_config(DataConfig(), _records(tmp_path, sizes), next_model.processor)
    assert len(dataset) == 3
    proc = next_model.processor
    for item, size in zip(dataset, sizes):
        assert item["image_sizes"] == [size]
        placeholders = int((item["input_ids"] == next_model.image_token_id).sum())
        assert placeholders == proc.image_tokens(proc.images.layout(size))
    batch = Collator(next_model.tokenizer.pad_token_id)([dataset[i] for i in range(3)])
    assert batch["image_sizes"] == sizes
    model = VisionLanguageModel.from_config(next_model.cfg)  # a fresh copy to train
    model.load_state_dict(next_model.state_dict())
    loss = model(**model_inputs(batch)).loss
    loss.backward()
    assert torch.isfinite(loss) and model.bridge.image_newline.grad.abs().sum() > 0
    # packed rows give the same loss: image sizes travel in packed order with the pixels
    packed = PackingCollator(next_model.tokenizer.pad_token_id, 512)([dataset[i] for i in range(3)])
    with torch.no_grad():
        again = model(**model_inputs(packed)).loss
    assert torch.allclose(again, loss.detach(), atol=1e-5)


def test_placeholder_mismatch_names_the_sample(next_model, tmp_path):
    dataset = VLMDataset.from_config(DataConfig(), _records(tmp_path, [(50, 30)]), next_model.processor)
    batch = Collator(next_model.tokenizer.pad_token_id)([dataset[0]])
    batch["image_sizes"] = [(30, 50)]  # another size: another token count
    with pytest.raises(ImageTokenMismatchError, match="sample 's0'.*LLaVA-NeXT"):
        next_model(**model_inputs(batch))
    del batch["image_sizes"]
    with pytest.raises(ImageTokenMismatchError, match="needs each image's size"):
        next_model(**model_inputs(batch))


def test_chat_and_save_load_keep_the_layout(next_model, tmp_path):
    image = random_image(3, (70, 40))
    predictor = Predictor(next_model)
    first = predictor.chat([{"role": "user", "content": "<image>\nWhat is it?"}], [image], max_new_tokens=4)
    again = VisionLanguageModel.from_pretrained(next_model.save_pretrained(tmp_path / "m"))
    assert again.llava_next and torch.equal(again.bridge.image_newline, next_model.bridge.image_newline)
    second = Predictor(again).chat(
        [{"role": "user", "content": "<image>\nWhat is it?"}], [image], max_new_tokens=4
    )
    assert first.token_ids == second.token_ids and first.prompt_tokens == second.prompt_tokens


def test_llava_next_layout_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="needs prefix fusion"):
        VisionLanguageModel.from_config(tiny_model_config(processor=TINY, fusion=FusionConfig.make("xattn")))
    qformer = tiny_model_config(processor=TINY, bridge=BridgeConfig.make("qformer", num_queries=6))
    with pytest.raises(ValueError, match="square token map per tile"):
        VisionLanguageModel.from_config(qformer).processor  # noqa: B018
    with pytest.raises(ValueError, match="unknown processor.anyres_layout 'grid'"):
        _next_processor("grid")
