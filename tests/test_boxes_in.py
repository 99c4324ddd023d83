"""Grounding boxes on the way in (issue 15, item 10): boxes that training records write for the original image
are mapped through the resize mode onto the model input, the frame answers are decoded from; Kosmos-2's
location vocabulary as single tokens."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.config import DataConfig, LLMConfig, ProcessorConfig
from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.dataset import VLMDataset
from vlmkit.data.grounding import Box, box_to_model_input, box_to_original, format_box, parse_boxes
from vlmkit.data.processor import Processor, VisionGeometry
from vlmkit.models.llm import KOSMOS2_TOKENS, build_llm
from vlmkit.models.tiny_tokenizer import build_tiny_tokenizer

from conftest import random_image

SIZE = 32  # the model input side
ORIGINAL = (200, 100)
BOX = Box(110.0, 20.0, 150.0, 80.0)  # inside the centre crop window (x 50..150) too
REGION = Box(60.0, 10.0, 100.0, 50.0)
# how far a coordinate may move through quantization, in model-input pixels
TOLERANCE = {"qwen": 0.05, "kosmos": 3.1, "shikra": 0.05, "pixel": 0.51}  # kosmos: 32 cells, centres


def _processor(mode: str, fmt: str) -> Processor:
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    cfg = ProcessorConfig(
        resize=mode, grounding_format=fmt, anyres_grid=[[64, 32], [32, 64], [64, 64]], template="chatml"
    )
    return Processor(cfg, tok, VisionGeometry(SIZE, tokens_per_tile=4))


def _dataset(tmp_path, proc: Processor, fmt: str) -> VLMDataset:
    random_image(0, ORIGINAL).save(tmp_path / "wide.png")
    record = {
        "id": "g0",
        "image": "wide.png",
        "conversations": [
            {
                "from": "human",
                "value": f"<image>\nWhat is in {format_box(REGION, fmt, *ORIGINAL)}? Where is it?",
            },
            {"from": "gpt", "value": format_box(BOX, fmt, *ORIGINAL, ref="the dog")},
        ],
    }
    (tmp_path / "data.json").write_text(json.dumps([record]))
    return VLMDataset.from_config(DataConfig(), tmp_path / "data.json", proc)


def _close(a: Box, b: Box, tol: float) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a.to_xyxy(), b.to_xyxy()))


@pytest.mark.parametrize("fmt", ["qwen", "kosmos", "shikra", "pixel"])
@pytest.mark.parametrize("mode", ["resize", "pad", "crop", "anyres"])
def test_box_for_the_original_is_learned_on_the_model_input_and_decoded_back(mode, fmt, tmp_path):
    proc = _processor(mode, fmt)
    item = _dataset(tmp_path, proc, fmt)[0]
    layout = proc.images.layout(ORIGINAL)
    tol = TOLERANCE[fmt]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    answer = proc.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    [(ref, learned)] = parse_boxes(answer, fmt, SIZE, SIZE)
    assert ref == "the dog"
    assert _close(learned, box_to_model_input(BOX, layout), tol)  # the target is the model-input box
    [(_, decoded)] = proc.boxes_to_original(answer, layout)  # ... and the output side maps it back
    scale = max(ORIGINAL) / SIZE  # one model-input pixel in original pixels (the largest case)
    assert _close(decoded, BOX, (tol + 0.01) * scale * 2)
    # the question's box moved the same way
    prompt = proc.tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    asked = [box for _, box in parse_boxes(prompt, fmt, SIZE, SIZE)]
    assert any(_close(box, box_to_model_input(REGION, layout), tol) for box in asked)
    if mode in ("pad", "crop"):  # unmapped, the same text would decode somewhere else entirely
        [(_, raw)] = parse_boxes(format_box(BOX, fmt, *ORIGINAL), fmt, SIZE, SIZE)
        assert not _close(box_to_original(raw, layout), BOX, 10.0)


def test_chat_prompts_map_boxes_too_and_unknown_formats_stay_as_written():
    proc = _processor("pad", "qwen")
    question = f"What is in {format_box(REGION, 'qwen', *ORIGINAL)}?"
    text = proc.render([{"role": "user", "content": "<image>\n" + question}], sizes=[ORIGINAL])
    [(_, box)] = parse_boxes(text, "qwen", SIZE, SIZE)
    assert _close(box, box_to_model_input(REGION, proc.images.layout(ORIGINAL)), 0.05)
    assert proc.prompt_length([{"role": "user", "content": "<image>\n" + question}], [ORIGINAL]) == len(
        proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    free = _processor("pad", None)  # no grounding_format: nothing is rewritten
    assert question in free.render([{"role": "user", "content": "<image>\n" + question}], sizes=[ORIGINAL])


def test_kosmos2_location_tokens_are_single_tokens_in_the_vocabulary():
    torch.manual_seed(0)
    plain = build_llm(LLMConfig.make("tiny"))
    assert len(plain.tokenizer.tokenize("<loc_44>")) > 1  # plain text: many sub-tokens
    llm = build_llm(LLMConfig.make("tiny", location_tokens="kosmos2"))
    tok = llm.tokenizer
    for token in KOSMOS2_TOKENS:
        assert tok.tokenize(token) == [token], token
    assert {"<grounding>", "<phrase>", "</phrase>", "<object>", "</object>", "<loc_0>", "<loc_1023>"} <= set(
        KOSMOS2_TOKENS
    )
    text = "<grounding>" + format_box(
        BOX, "kosmos", *ORIGINAL, ref="a dog"
    )  # <p>a dog</p><box><loc_a><loc_b></box>
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 7 + len(tok("a dog", add_special_tokens=False)["input_ids"])  # one token per tag / loc
    assert tok.decode(ids, skip_special_tokens=True) == text  # answers keep their boxes after decoding
    assert llm.embeddings.num_embeddings >= len(tok) == len(plain.tokenizer) + len(KOSMOS2_TOKENS)
    with torch.no_grad():
        assert llm(input_ids=torch.tensor([ids])).logits.shape[-1] == llm.embeddings.num_embeddings
    with pytest.raises(ValueError, match="location_tokens 'kosmos3'"):
        build_llm(LLMConfig.make("tiny", location_tokens="kosmos3"))
