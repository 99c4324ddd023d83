"""Word bridges (vocab_mixture, object_slots) and the detection head behind them: tokens made of the LLM's own
word embeddings, objects grouped from patches, slots in reading order, boxes as digits, save/load."""

from __future__ import annotations

import pytest
import torch

from vlmkit.models.bridges import build_bridge
from vlmkit.models.detection import DetectionHead, Detections, group_objects, head_groups, sort_objects
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.models.word_bridges import (
    DetectorConfig,
    ObjectSlotsConfig,
    SlotsConfig,
    VocabMixtureConfig,
    embed_words,
)

from conftest import random_image, tiny_model_config

GROUPS = {"color": ["red", "blue"], "shape": ["circle", "square"]}


@pytest.fixture(scope="module")
def llm():
    from vlmkit.config import LLMConfig
    from vlmkit.models.llm import build_llm

    torch.manual_seed(0)
    return build_llm(LLMConfig(kind="tiny"))


def _word(llm, word: str, leading_space: bool = True) -> torch.Tensor:
    ids = llm.tokenizer(f" {word}" if leading_space else word, add_special_tokens=False)["input_ids"]
    return llm.embeddings.weight.detach()[ids].float().mean(dim=0)


def test_embed_words_are_the_llms_token_embeddings(llm):
    table = llm.embeddings.weight.detach()
    out = embed_words(llm, ["red", "7", "triangle"])
    ids = llm.tokenizer(" red", add_special_tokens=False)["input_ids"]
    assert torch.equal(out[0], table[ids].mean(dim=0))
    assert torch.allclose(embed_words(llm, ["7"], leading_space=False)[0], _word(llm, "7", False))
    assert out.shape == (3, llm.hidden_size)


def test_vocab_mixture_rows_start_from_the_llms_words_and_mix_by_probability(llm):
    cfg = VocabMixtureConfig(kind="vocab_mixture", vocab_words=["red", "blue"], vocab_size=5)
    bridge = build_bridge(8, llm.hidden_size, cfg)
    bridge.bind_llm(llm)
    table = bridge.tables[0].weight
    assert table.shape == (5, llm.hidden_size)
    assert torch.allclose(table[0], _word(llm, "red")) and torch.allclose(table[1], _word(llm, "blue"))
    rms = llm.embeddings.weight.detach().pow(2).mean().sqrt()
    assert 0.5 * rms < table[2:].pow(2).mean().sqrt() < 2 * rms  # learned rows start at the word scale
    with torch.no_grad():  # a head that is sure of word 1 everywhere: every token is E[blue]
        bridge.head.weight.zero_()
        bridge.head.bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0, 0.0]))
    tokens = bridge(torch.randn(2, 4, 8))
    assert tokens.shape == (2, 4, llm.hidden_size)
    assert torch.allclose(tokens, _word(llm, "blue").expand_as(tokens), atol=1e-5)


def _detections(n: int = 16) -> Detections:
    """A 4x4 grid: patches 1, 2 are a red circle (box right of centre), patch 8 a blue square (left), the rest
    background; probabilities over [background, words]."""
    color, shape = torch.zeros(1, n, 3), torch.zeros(1, n, 3)
    color[..., 0] = shape[..., 0] = 1.0
    boxes = torch.full((1, n, 4), 0.5)
    for patch in (1, 2):
        color[0, patch] = torch.tensor([0.0, 0.75, 0.25])  # mostly red
        shape[0, patch] = torch.tensor([0.0, 1.0, 0.0])  # circle
        boxes[0, patch] = torch.tensor([0.5, 0.1, 0.75, 0.35])
    color[0, 8] = torch.tensor([0.0, 0.0, 1.0])  # blue
    shape[0, 8] = torch.tensor([0.0, 0.0, 1.0])  # square
    boxes[0, 8] = torch.tensor([0.0, 0.6, 0.25, 0.9])
    return Detections([color, shape], boxes)


def test_group_objects_merges_patches_of_one_box_and_sorts_left_to_right():
    det = _detections()
    objects = group_objects(det.objectness[0], det.boxes[0], threshold=0.5, iou=0.5)
    assert len(objects) == 2
    assert sorted(o.weights.nonzero().flatten().tolist() for o in objects) == [[1, 2], [8]]
    ordered = sort_objects(objects)
    assert ordered[0].weights[8] > 0 and torch.allclose(ordered[1].box, torch.tensor([0.5, 0.1, 0.75, 0.35]))
    assert sort_objects(objects, "top_to_bottom")[0].weights[1] > 0  # the red circle is higher up
    assert group_objects(det.objectness[0] * 0.4, det.boxes[0], threshold=0.5) == []


def _slots(llm, **slots) -> torch.nn.Module:
    cfg = ObjectSlotsConfig(
        kind="object_slots", detector=DetectorConfig(groups=GROUPS), slots=SlotsConfig(**slots)
    )
    bridge = build_bridge(8, llm.hidden_size, cfg)
    bridge.bind_llm(llm)
    bridge.head.forward = lambda features: _detections()  # the head's output, fixed
    return bridge


def test_object_slots_are_word_mixtures_then_box_digits_in_reading_order(llm):
    bridge = _slots(llm, num=3, location_scale=64)
    tokens = bridge(torch.zeros(1, 16, 8))[0]  # [3 slots x (2 + 8), D]
    assert tokens.shape == (30, llm.hidden_size) and bridge.num_tokens(16) == 30
    word = {w: _word(llm, w) for w in ["red", "blue", "circle", "square", "."]}
    digit = {d: _word(llm, str(d), leading_space=False) for d in range(10)}
    # slot 1: the blue square at x 0-16 px: box 0, 38, 16, 58 (0.6 * 64 = 38.4, 0.9 * 64 = 57.6)
    assert torch.allclose(tokens[0], word["blue"]) and torch.allclose(tokens[1], word["square"])
    expected_digits = [0, 0, 3, 8, 1, 6, 5, 8]
    assert all(torch.allclose(tokens[2 + i], digit[d]) for i, d in enumerate(expected_digits))
    # slot 2: the red circle, its colour token the probability mixture 0.75 red + 0.25 blue
    assert torch.allclose(tokens[10], 0.75 * word["red"] + 0.25 * word["blue"], atol=1e-6)
    assert torch.allclose(tokens[11], word["circle"])
    assert [
        int(torch.allclose(tokens[12 + i], digit[d])) for i, d in enumerate([3, 2, 0, 6, 4, 8, 2, 2])
    ] == [1] * 8
    # slot 3: empty
    assert all(torch.allclose(t, word["."]) for t in tokens[20:])


def test_object_slots_layout_and_no_location(llm):
    tokens = _slots(llm, num=2, layout="labels_first")(torch.zeros(1, 16, 8))[0]
    word = {w: _word(llm, w) for w in ["blue", "square", "circle"]}
    # all slots' label words first, then all boxes
    assert torch.allclose(tokens[1], word["square"]) and torch.allclose(tokens[3], word["circle"])
    plain = _slots(llm, num=2, location="none")
    assert plain.num_tokens(16) == 4 and plain(torch.zeros(1, 16, 8)).shape == (1, 4, llm.hidden_size)


def test_object_slots_numbered_and_separated(llm):
    bridge = _slots(llm, num=3, index=True, separator=",")
    tokens = bridge(torch.zeros(1, 16, 8))[0]  # [3 slots x (1 + 2 + 8 + 1), D]
    assert tokens.shape == (36, llm.hidden_size) and bridge.num_tokens(16) == 36
    word = {w: _word(llm, w) for w in ["1", "2", "blue", "square", "red", "circle", "."]}
    comma = _word(llm, ",", leading_space=False)
    # slot 1: "1 blue square <8 digits> ,"; slot 2: "2 red circle <8 digits> ,"
    assert torch.allclose(tokens[0], word["1"]) and torch.allclose(tokens[1], word["blue"])
    assert torch.allclose(tokens[2], word["square"]) and torch.allclose(tokens[11], comma)
    assert torch.allclose(tokens[12], word["2"]) and torch.allclose(tokens[14], word["circle"])
    assert torch.allclose(tokens[23], comma)
    # slot 3 is empty: filler only (no number, no separator), so numbers and commas count the objects found
    assert all(torch.allclose(t, word["."]) for t in tokens[24:36])
    # labels_first: each slot's number and words, closed, then the boxes
    first = _slots(llm, num=2, index=True, separator=",", layout="labels_first")(torch.zeros(1, 16, 8))[0]
    assert torch.allclose(first[3], comma) and torch.allclose(first[4], word["2"])
    assert torch.allclose(first[7], comma) and first.shape[0] == 2 * (1 + 2 + 8 + 1)


def test_object_slots_start_with_the_count_of_objects_found(llm):
    bridge = _slots(llm, num=3, count=True)
    tokens = bridge(torch.zeros(1, 16, 8))[0]  # [count + 3 slots x (2 + 8), D]
    assert tokens.shape == (31, llm.hidden_size) and bridge.num_tokens(16) == 31
    word = {w: _word(llm, w) for w in ["0", "2", "blue", "square", "."]}
    # two objects found: the count word "2", then the slots exactly as without the count
    assert torch.allclose(tokens[0], word["2"])
    plain = _slots(llm, num=3)(torch.zeros(1, 16, 8))[0]
    assert torch.equal(tokens[1:], plain)
    # nothing found: "0", then filler only
    bridge.head.forward = lambda features: Detections(
        [torch.eye(3)[torch.zeros(16, dtype=torch.long)][None]] * 2, torch.full((1, 16, 4), 0.5)
    )
    empty = bridge(torch.zeros(1, 16, 8))[0]
    assert torch.allclose(empty[0], word["0"]) and all(torch.allclose(t, word["."]) for t in empty[1:])


def test_object_slots_with_a_prefix_word_read_like_noun_phrases(llm):
    bridge = _slots(llm, num=3, prefix="a", separator=",")
    tokens = bridge(torch.zeros(1, 16, 8))[0]  # [3 slots x (1 + 2 + 8 + 1), D]
    assert tokens.shape == (36, llm.hidden_size) and bridge.num_tokens(16) == 36
    word = {w: _word(llm, w) for w in ["a", "blue", "square", "circle", "."]}
    # "a blue square <8 digits> , a red circle <8 digits> ," then an empty slot of filler only
    assert torch.allclose(tokens[0], word["a"]) and torch.allclose(tokens[1], word["blue"])
    assert torch.allclose(tokens[2], word["square"]) and torch.allclose(tokens[12], word["a"])
    assert torch.allclose(tokens[14], word["circle"])
    assert all(torch.allclose(t, word["."]) for t in tokens[24:])
    numbered = _slots(llm, num=2, prefix="a", index=True)(torch.zeros(1, 16, 8))[0]
    assert torch.allclose(numbered[0], word["a"]) and torch.allclose(numbered[1], _word(llm, "1"))


def test_object_slot_gradients_reach_the_detected_patches_only(llm):
    torch.manual_seed(0)
    cfg = ObjectSlotsConfig(
        kind="object_slots", detector=DetectorConfig(groups=GROUPS), slots=SlotsConfig(num=2)
    )
    bridge = build_bridge(8, llm.hidden_size, cfg)
    with torch.no_grad():  # patch features set objectness: feature 0 > 0 makes a patch an object
        bridge.head.dense[1].weight.zero_()
        bridge.head.dense[1].bias.zero_()
        bridge.head.dense[1].weight[0, 0] = bridge.head.dense[1].weight[3, 0] = -20.0  # background logits
        bridge.head.dense[1].weight[[1, 2, 4, 5], 1:] = torch.randn(4, 7)  # label logits: any function
    x = torch.randn(1, 16, 8)
    x[0, :, 0] = -5.0
    x[0, 5, 0] = 5.0  # only patch 5 is an object
    x.requires_grad_(True)
    bridge(x).pow(2).sum().backward()
    got = x.grad[0].abs().sum(dim=-1)
    assert got[5] > 0 and got[torch.arange(16) != 5].eq(0).all()


def test_object_slots_need_label_words():
    with pytest.raises(ValueError, match="detector.groups .* or\\s+bridge.detector.path"):
        build_bridge(8, 16, ObjectSlotsConfig(kind="object_slots"))
    with pytest.raises(ValueError, match="unknown bridge.slots.location 'boxes'"):
        build_bridge(
            8, 16, ObjectSlotsConfig(kind="object_slots", detector=DetectorConfig(groups=GROUPS),
                                slots=SlotsConfig(location="boxes"))
        )  # fmt: skip


def test_detection_head_files_round_trip_and_refuse_other_words(tmp_path):
    torch.manual_seed(0)
    head = DetectionHead(8, GROUPS)
    head.save(tmp_path)
    assert head_groups(tmp_path) == GROUPS
    other = DetectionHead(8, GROUPS)
    other.load(tmp_path)
    assert torch.equal(other.dense[1].weight, head.dense[1].weight)
    with pytest.raises(ValueError, match="label groups"):
        DetectionHead(8, {"color": ["red"]}).load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no detection_head.safetensors"):
        DetectionHead(8, GROUPS).load(tmp_path / "nowhere")


def test_vlm_with_object_slots_saves_loads_and_forgets_the_head_path(tmp_path):
    torch.manual_seed(0)
    head = DetectionHead(32, GROUPS)
    head.save(tmp_path / "pretrained")
    cfg = tiny_model_config(
        bridge=ObjectSlotsConfig(
            kind="object_slots",
            detector=DetectorConfig(path=str(tmp_path / "pretrained")),
            slots=SlotsConfig(num=2),
        )
    )
    model = VisionLanguageModel.from_config(cfg).eval()
    assert torch.equal(model.bridge.head.dense[1].weight, head.dense[1].weight)  # loaded from the path
    assert model.tokens_per_image() == 2 * (2 + 8)
    batch = model.prepare_prompts(["<image>\nWhat is it?"], [[random_image(0)]])
    saved = model.save_pretrained(tmp_path / "model")
    (tmp_path / "pretrained" / "detection_head.safetensors").unlink()  # the saved model needs no path
    loaded = VisionLanguageModel.from_pretrained(saved)
    assert loaded.cfg.bridge.detector.path is None and loaded.cfg.bridge.detector.groups == GROUPS
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
