"""Tests for vlmkit.data.grounding: Box, the four text formats, the tolerant parser and coordinate maps."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from vlmkit.data.grounding import (
    GROUNDING_FORMATS,
    Box,
    box_to_model_input,
    box_to_original,
    format_box,
    parse_boxes,
)
from vlmkit.data.images import anyres_tiles, image_mean_color, resize_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def _close(a: Box, b: Box, tol: float = 1e-6) -> bool:
    return all(abs(p - q) <= tol for p, q in zip(a.to_xyxy(), b.to_xyxy()))


# ---------------------------------------------------------------------------------------------------- Box


def test_box_basics() -> None:
    b = Box.from_xywh(10, 20, 30, 40)
    assert b == Box(10, 20, 40, 60)
    assert b.to_xywh() == (10, 20, 30, 40)
    assert b.area() == 1200
    assert Box(0, 0, 10, 10).iou(Box(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert Box(0, 0, 10, 10).iou(Box(20, 20, 30, 30)) == 0.0
    assert Box(0, 0, 10, 10).iou(Box(0, 0, 10, 10)) == 1.0
    assert Box(50, -5, -10, 120).clip(40, 100) == Box(0, 0, 40, 100)  # swapped + out of range
    with pytest.raises(AttributeError):
        b.x1 = 3  # type: ignore[misc]  # frozen


# ----------------------------------------------------------------------------------------------- formats


def test_format_box_known_strings() -> None:
    b = Box(120, 300, 500, 810)
    assert format_box(b, "qwen", 1000, 1000, ref="a dog") == "<ref>a dog</ref><box>(120,300),(500,810)</box>"
    assert format_box(b, "qwen", 1000, 1000) == "<box>(120,300),(500,810)</box>"
    # qwen: int(x / W * 1000) clamped to 999 — the right/bottom edge never reaches 1000
    assert format_box(Box(64, 48, 640, 480), "qwen", 640, 480) == "<box>(100,100),(999,999)</box>"
    assert format_box(b, "shikra", 1000, 1000, ref="a dog") == "a dog [0.120,0.300,0.500,0.810]"
    assert format_box(Box(60, 60, 250, 162), "shikra", 500, 200) == "[0.120,0.300,0.500,0.810]"
    assert format_box(b, "pixel", 1000, 1000, ref="a dog") == "a dog [120, 300, 500, 810]"
    # kosmos: top-left cell (col 12, row 1) → 44; bottom-right cell (col 31, row 26) → 26*32+31 = 863
    s = format_box(Box(390, 50, 980, 830), "kosmos", 1000, 1000, ref="a snowman")
    assert s == "<p>a snowman</p><box><loc_44><loc_863></box>"
    with pytest.raises(ValueError, match="qwen, kosmos, shikra, pixel"):
        format_box(b, "yolo", 10, 10)


def test_kosmos_decodes_like_the_reference() -> None:
    # HF Kosmos-2 docs: <patch_index_0044><patch_index_0863> → (0.390625, 0.046875, 0.984375, 0.828125)
    text = "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
    [(ref, box)] = parse_boxes(text, "kosmos", 1000, 500)
    assert ref == "a snowman"
    assert _close(box, Box(390.625, 23.4375, 984.375, 414.0625))
    # a box within one row of cells decodes to cell edges, not centres
    [(_, one_row)] = parse_boxes("<box><loc_33><loc_35></box>", "kosmos", 320, 320)
    assert _close(one_row, Box(10, 10, 40, 20))


@pytest.mark.parametrize("fmt", GROUNDING_FORMATS)
@pytest.mark.parametrize(("w", "h"), [(640, 480), (333, 777), (1000, 1000)])
def test_round_trip_within_one_bin(fmt: str, w: int, h: int) -> None:
    tol = {"qwen": 1 / 1000, "kosmos": 1 / 32, "shikra": 1 / 1000, "pixel": 0.5 / min(w, h)}[fmt]
    rng = random.Random(0)
    for _ in range(100):
        xs = sorted(rng.uniform(0, w) for _ in range(2))
        ys = sorted(rng.uniform(0, h) for _ in range(2))
        box = Box(xs[0], ys[0], xs[1], ys[1])
        text = format_box(box, fmt, w, h, ref="the object")
        parsed = parse_boxes(text, fmt, w, h)
        assert len(parsed) == 1, text
        ref, got = parsed[0]
        assert ref == "the object"
        assert abs(got.x1 - box.x1) <= tol * w + 1e-9 and abs(got.x2 - box.x2) <= tol * w + 1e-9, text
        assert abs(got.y1 - box.y1) <= tol * h + 1e-9 and abs(got.y2 - box.y2) <= tol * h + 1e-9, text
        assert parse_boxes(text, None, w, h) == parsed  # auto-detection agrees


# ------------------------------------------------------------------------------------------------ parser


def test_parse_messy_qwen() -> None:
    text = "<ref> the dog <box>( 12 , 34 ) , ( 56,78 )</box> and <ref>cat</ref><box>56,78,12,34</box>"
    assert parse_boxes(text, "qwen", 1000, 500) == [
        ("the dog", Box(12, 17, 56, 39)),  # missing </ref>, spaces; y scaled by 500/1000
        ("cat", Box(12, 17, 56, 39)),  # no parentheses, swapped corners
    ]
    text = "<ref>x</ref><box>[100, 200, 1200, -5]</box><box>1,2</box> garbage <box>nan</box><box>(1,2),(3,4)"
    assert parse_boxes(text, None, 1000, 1000) == [
        ("x", Box(100, 0, 1000, 200)),  # brackets inside <box>, out of range clamped
        (None, Box(1, 2, 3, 4)),  # missing </box>; prose before it drops the stale phrase
    ]
    qwen2 = "<|object_ref_start|>car<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
    assert parse_boxes(qwen2, None, 500, 500) == [("car", Box(50, 100, 150, 200))]
    two = "<ref>dogs</ref><box>(0,0),(100,100)</box><box>(500,500),(600,600)</box>"
    assert [r for r, _ in parse_boxes(two, "qwen", 100, 100)] == ["dogs", "dogs"]  # a phrase with two boxes


def test_parse_messy_brackets() -> None:
    text = "The dog [0.1, 0.2, 0.5, 0.8], the cat [10, 20, 30, 40] and [abc] [1,2,3] [ 0.9;0.9;0.1;0.1 ]"
    got = parse_boxes(text, None, 1000, 500)
    assert got == [
        ("The dog", Box(100, 100, 500, 400)),  # normalised floats → shikra
        ("the cat", Box(10, 20, 30, 40)),  # integers → pixels
        (None, Box(100, 50, 900, 450)),  # swapped, ';' separators
    ]
    assert parse_boxes("a box [1.5, -3, 2000, 40]", "pixel", 100, 100) == [("a box", Box(1.5, 0, 100, 40))]
    assert parse_boxes("[0.5,0.5,1.7,1.2]", "shikra", 200, 100) == [(None, Box(100, 50, 200, 100))]


def test_parse_garbage_never_raises() -> None:
    for text in [
        "",
        "<box>",
        "[[[[",
        "<ref></ref><box></box>",
        "<ref>unterminated",
        "<loc_5>",
        "]]<box>)(",
        "<box><loc_9999><loc_-1></box>",
        "[1e999, 0, 1, 1]",
        "<p>x</p><object><patch_index_0001>",
    ]:
        for fmt in (None, *GROUNDING_FORMATS):
            for _, box in parse_boxes(text, fmt, 64, 48):
                assert 0 <= box.x1 <= box.x2 <= 64 and 0 <= box.y1 <= box.y2 <= 48
    assert parse_boxes("<box>(1,2),(3,4)</box>", "kosmos", 10, 10) == []  # the format filter holds
    assert parse_boxes("a dog [1, 2, 3, 4]", "qwen", 10, 10) == []
    with pytest.raises(ValueError, match="known"):
        parse_boxes("x", "yolo", 10, 10)


# ---------------------------------------------------------------------------------------- coordinate maps


@pytest.mark.parametrize("strategy", ["pad", "resize", "crop"])
def test_drawn_box_survives_resize_and_maps_back(strategy: str) -> None:
    fill = image_mean_color(CLIP_MEAN)
    orig = Image.new("RGB", (300, 150), (255, 255, 255))
    drawn = Box(90, 30, 180, 120)  # pixel columns 90..179, rows 30..119
    orig.paste((255, 0, 0), tuple(int(v) for v in drawn.to_xyxy()))
    out, tf = resize_image(orig, 100, strategy, fill=fill)
    arr = np.asarray(out).astype(int)
    ys, xs = np.nonzero((arr[..., 0] > 200) & (arr[..., 1] < 90) & (arr[..., 2] < 90))
    seen = Box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # the red rectangle as the model sees it
    expected = box_to_model_input(drawn, tf)
    assert _close(seen, expected, tol=1.0)
    back = box_to_original(seen, tf)
    px = 1 / min(tf.scale_x, tf.scale_y)  # one model-input pixel in original pixels
    assert _close(back, drawn, tol=px + 1e-6)
    assert back.iou(drawn) > 0.9


def test_pad_mapping_hand_computed() -> None:
    _, tf = resize_image(Image.new("RGB", (300, 150)), 100, "pad")  # scale 1/3, content rows 25..75
    b = Box(90, 30, 180, 120)
    assert _close(box_to_model_input(b, tf), Box(30, 35, 60, 65))
    assert _close(box_to_original(box_to_model_input(b, tf), tf), b)
    assert _close(box_to_original(Box(0, 0, 100, 100), tf), Box(0, 0, 300, 150))  # pad bands clipped away


def test_crop_mapping_clips_to_the_visible_window() -> None:
    _, tf = resize_image(Image.new("RGB", (300, 100)), 100, "crop")  # keeps x in [100, 200)
    assert _close(box_to_model_input(Box(50, 10, 250, 90), tf), Box(0, 10, 100, 90))
    assert _close(box_to_original(Box(0, 10, 100, 90), tf), Box(100, 10, 200, 90))


def test_anyres_layout_maps_through_the_global_view() -> None:
    _, layout = anyres_tiles(Image.new("RGB", (800, 600)), [(672, 672), (1008, 336)], 336)
    b = Box(400, 300, 800, 600)
    g = box_to_model_input(b, layout)
    assert _close(g, Box(168, 168, 336, 336))  # 336/800 = 0.42, 336/600 = 0.56
    assert _close(box_to_original(g, layout), b)
