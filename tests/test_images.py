"""Tests for vlmkit.data.images: safe loading, resize strategies, AnyRes tiling and token accounting."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vlmkit.data.images import (
    AnyResLayout,
    ImageError,
    ImageTransform,
    anyres_num_tiles,
    anyres_tiles,
    gpt4v_image_tokens,
    image_mean_color,
    load_image,
    resize_image,
    select_best_resolution,
    to_tensor,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NEXT_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # LLaVA-NeXT defaults


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR claims width×height (a decompression-bomb header with no pixel data)."""
    data = bytearray(_encode(Image.new("RGB", (4, 4), (9, 9, 9))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ----------------------------------------------------------------------------------------------- loading


def test_load_image_errors_by_reason(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "nope.png")
    assert e.value.reason == "missing_file"
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "empty.png")
    assert e.value.reason == "empty_file"
    with pytest.raises(ImageError) as e:
        load_image(b"")
    assert e.value.reason == "empty_file"
    with pytest.raises(ImageError) as e:
        load_image(b"this is not an image at all, just some text")
    assert e.value.reason == "corrupt"
    png = _encode(Image.new("RGB", (20, 20)))
    with pytest.raises(ImageError) as e:
        load_image(png, max_bytes=len(png) - 1)
    assert e.value.reason == "too_large"
    assert isinstance(e.value, ValueError)
    (tmp_path / "ok.png").write_bytes(png)
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "ok.png", max_bytes=10)
    assert e.value.reason == "too_large"
    assert load_image(str(tmp_path / "ok.png"), max_bytes=len(png)).size == (20, 20)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_raises_truncated(fmt: str) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _encode(img, fmt)
    with pytest.raises(ImageError) as e:
        load_image(data[: len(data) // 2])
    assert e.value.reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never flipped globally


def test_pixel_limit_checked_from_header_before_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    # 9000×9000 = 81 MP claimed by the header, with no pixel data: a decode would fail as "truncated",
    # so "too_many_pixels" proves the check ran on the header alone (and below PIL's own 89 MP warning).
    with pytest.raises(ImageError) as e:
        load_image(_png_with_header_size(9000, 9000))
    assert e.value.reason == "too_many_pixels"
    # 20000×20000 trips PIL's own DecompressionBombError inside Image.open: still our error type
    with pytest.raises(ImageError) as e:
        load_image(_png_with_header_size(20000, 20000), max_pixels=10**12)
    assert e.value.reason == "too_many_pixels"

    def _no_decode(self):  # any decode attempt fails the test
        raise AssertionError("decoded an image that exceeds max_pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_decode)
    with pytest.raises(ImageError) as e:
        load_image(_encode(Image.new("RGB", (100, 50))), max_pixels=100 * 50 - 1)
    assert e.value.reason == "too_many_pixels"


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img = load_image(_encode(stored, "JPEG", exif=exif, quality=95))
    assert img.size == (20, 40)
    r, _, b = img.getpixel((10, 5))  # stored left half is now the top half
    assert r > 200 and b < 60
    r, _, b = img.getpixel((10, 35))
    assert b > 200 and r < 60


def test_modes_convert_to_rgb_with_alpha_on_background() -> None:
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))  # fully transparent red
    assert load_image(_encode(rgba)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(_encode(rgba), background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)
    half = Image.new("RGBA", (2, 2), (255, 0, 0, 255))
    half.putalpha(128)
    r, g, b = load_image(_encode(half)).getpixel((0, 0))  # 255*128/255 + 255*(127/255): red over white
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    la = Image.new("LA", (2, 2), (100, 0))
    assert load_image(_encode(la)).getpixel((1, 1)) == (255, 255, 255)
    assert load_image(_encode(Image.new("L", (3, 1), 100))).getpixel((0, 0)) == (100, 100, 100)
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    assert load_image(_encode(pal)).getpixel((0, 0)) == (10, 20, 30)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 1
    assert load_image(_encode(pal_t, transparency=1)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (2, 2), (255, 0, 0, 0))  # pure cyan ink
    assert load_image(_encode(cmyk, "JPEG", quality=100)).mode == "RGB"
    r, g, b = load_image(_encode(cmyk, "TIFF")).getpixel((0, 0))
    assert (r, g, b) == (0, 255, 255)
    deep = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))  # 16-bit white, not clipped weirdly
    assert load_image(_encode(deep)).getpixel((0, 0)) == (255, 255, 255)


def test_one_pixel_image_through_every_path() -> None:
    img = load_image(_encode(Image.new("RGB", (1, 1), (10, 20, 30))))
    assert img.size == (1, 1) and img.mode == "RGB"
    for strategy in ("resize", "pad", "crop"):
        out, tf = resize_image(img, 7, strategy)
        assert out.size == (7, 7)
        assert out.getpixel((3, 3)) == (10, 20, 30)
        assert tf.orig_size == (1, 1) and tf.out_size == (7, 7)
    tiles, layout = anyres_tiles(img, [(14, 14), (28, 14)], 7)
    assert len(tiles) == layout.num_tiles == 5 and all(t.size == (7, 7) for t in tiles)


# -------------------------------------------------------------------------------------------- resizing


def test_resize_stretch_transform() -> None:
    out, tf = resize_image(Image.new("RGB", (200, 100)), 50, "resize")
    assert out.size == (50, 50)
    assert (tf.scale_x, tf.scale_y, tf.offset_x, tf.offset_y) == (0.25, 0.5, 0.0, 0.0)
    assert tf.apply_xy(200, 100) == (50, 50)
    assert tf.invert_xy(25, 25) == (100, 50)


def test_pad_letterboxes_with_mean_color() -> None:
    fill = image_mean_color(CLIP_MEAN)
    assert fill == (122, 116, 104)  # int(0.48145466*255), int(0.4578275*255), int(0.40821073*255)
    img = Image.new("RGB", (200, 100), (200, 10, 10))
    out, tf = resize_image(img, 100, "pad", fill=fill)
    assert out.size == (100, 100)
    assert (tf.scale_x, tf.scale_y, tf.offset_x, tf.offset_y) == (0.5, 0.5, 0.0, 25.0)
    assert out.getpixel((50, 10)) == fill and out.getpixel((50, 90)) == fill  # bands above / below
    assert out.getpixel((50, 50)) == (200, 10, 10)
    assert tf.apply_xy(0, 0) == (0.0, 25.0) and tf.apply_xy(200, 100) == (100.0, 75.0)
    tall, tf2 = resize_image(Image.new("RGB", (50, 200), (1, 2, 3)), 100, "pad", fill=fill)
    # expand2square: pasted at (200-50)//2 = 75 on the 200-px square, which is then halved
    assert (tf2.offset_x, tf2.offset_y) == (37.5, 0.0)
    assert tall.getpixel((10, 50)) == fill and tall.getpixel((50, 50)) == (1, 2, 3)


def test_crop_keeps_the_center() -> None:
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))  # red | green | blue thirds
    img.paste((0, 0, 255), (200, 0, 300, 100))
    out, tf = resize_image(img, 50, "crop")
    assert out.size == (50, 50)
    assert (tf.scale_x, tf.scale_y, tf.offset_x, tf.offset_y) == (0.5, 0.5, -50.0, 0.0)
    arr = np.asarray(out)
    assert (arr[:, 2:-2, 1] > 250).all() and (arr[:, 2:-2, [0, 2]] < 5).all()  # only the green third
    assert tf.invert_xy(0, 0) == (100.0, 0.0) and tf.invert_xy(50, 50) == (200.0, 100.0)


def test_unknown_strategy_lists_known() -> None:
    with pytest.raises(ValueError, match="resize, pad, crop"):
        resize_image(Image.new("RGB", (4, 4)), 2, "squash")


def test_transform_round_trip_and_boxes() -> None:
    tf = ImageTransform(0.5, 0.25, 3.0, -7.0, (64, 64), (100, 200))
    x, y = tf.apply_xy(40.0, 80.0)
    assert (x, y) == (23.0, 13.0)
    assert tf.invert_xy(x, y) == (40.0, 80.0)
    assert tf.apply_box((40, 80, 0, 0)) == (3.0, 0.0, 23.0, 13.0)  # corners ordered, y clipped at 0
    assert tf.invert_box((0, 0, 64, 64)) == (0.0, 28.0, 100.0, 200.0)


def test_to_tensor_normalizes_channels_first() -> None:
    img = Image.new("RGB", (3, 2), (255, 0, 51))
    t = to_tensor(img, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert torch.allclose(t[:, 1, 2], torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]))
    t2 = to_tensor(Image.new("RGB", (1, 1), (0, 0, 0)), CLIP_MEAN, CLIP_STD)
    assert t2[0, 0, 0].item() == pytest.approx(-0.48145466 / 0.26862954, abs=1e-6)


# ------------------------------------------------------------------------------------------------ AnyRes


def test_select_best_resolution_known_cases() -> None:
    # 800×600: (672,672) keeps 672×504 effective pixels, more than any other candidate
    assert select_best_resolution((800, 600), NEXT_PINPOINTS) == (672, 672)
    # 1000×250: (1008,336) scales by 1.008 → effective min(1008*252, 250000) = 250000
    assert select_best_resolution((1000, 250), NEXT_PINPOINTS) == (1008, 336)
    assert select_best_resolution((250, 1000), NEXT_PINPOINTS) == (336, 1008)
    # 100×100: all candidates keep 10000 px; least waste is 336*672, first such candidate wins
    assert select_best_resolution((100, 100), NEXT_PINPOINTS) == (336, 672)
    # effective ties broken by waste: (672,336) vs (1008,336) for a 2:1 image both give 672×336
    assert select_best_resolution((1344, 672), [(1008, 336), (672, 336)]) == (672, 336)


def test_anyres_tiles_layout_and_box_mapping() -> None:
    img = Image.new("RGB", (800, 600), (200, 50, 50))
    tiles, layout = anyres_tiles(img, NEXT_PINPOINTS, 336)
    assert isinstance(layout, AnyResLayout)
    assert layout.resolution == (672, 672) and (layout.cols, layout.rows) == (2, 2)
    assert len(tiles) == layout.num_tiles == 5 == anyres_num_tiles((800, 600), NEXT_PINPOINTS, 336)
    assert layout.num_tiles * 576 == 2880  # tokens for a CLIP-L/336 tower
    assert all(t.size == (336, 336) for t in tiles)
    # grid canvas: 800×600 scaled by 0.84 → 672×504, centred vertically: 84 black rows on top
    assert tiles[1].getpixel((10, 10)) == (0, 0, 0) and tiles[1].getpixel((10, 200)) == (200, 50, 50)
    assert tiles[0].getpixel((0, 0)) == (200, 50, 50)  # the global view comes first, no padding
    assert layout.box_to_global((400, 300, 800, 600)) == pytest.approx((168.0, 168.0, 336.0, 336.0))
    assert layout.box_to_grid((400, 300, 800, 600)) == pytest.approx((336.0, 336.0, 672.0, 588.0))
    hits = layout.box_to_tiles((400, 300, 800, 600))
    assert len(hits) == 1 and hits[0][0] == 4
    assert hits[0][1] == pytest.approx((0.0, 0.0, 336.0, 252.0))
    assert [i for i, _ in layout.box_to_tiles((0, 0, 800, 600))] == [1, 2, 3, 4]


def test_anyres_num_tiles_and_validation() -> None:
    assert anyres_num_tiles((1000, 250), NEXT_PINPOINTS, 336) == 4  # 3×1 grid + global
    assert anyres_num_tiles((100, 100), NEXT_PINPOINTS, 336) == 3
    tiles, layout = anyres_tiles(Image.new("RGB", (1000, 250)), NEXT_PINPOINTS, 336)
    assert len(tiles) == 4 and (layout.cols, layout.rows) == (3, 1)
    with pytest.raises(ValueError, match="multiple of tile_size"):
        anyres_num_tiles((10, 10), [(300, 336)], 336)


# ---------------------------------------------------------------------------------------------- tokens


@pytest.mark.parametrize(
    ("w", "h", "detail", "tokens"),
    [
        (1024, 1024, "high", 765),  # → 768×768: 2×2 tiles
        (2048, 4096, "high", 1105),  # → 1024×2048 → 768×1536: 2×3 tiles
        (512, 512, "high", 255),  # 1 tile
        (4096, 8192, "high", 1105),  # same as 2048×4096 after the 2048 fit
        (513, 512, "high", 425),  # 2×1 tiles, never upscaled
        (100, 100, "high", 255),
        (4096, 4096, "low", 85),
    ],
)
def test_gpt4v_image_tokens(w: int, h: int, detail: str, tokens: int) -> None:
    assert gpt4v_image_tokens(w, h, detail) == tokens


def test_gpt4v_rejects_bad_detail() -> None:
    with pytest.raises(ValueError, match="low, high"):
        gpt4v_image_tokens(10, 10, "ultra")
