"""Image loading with safety limits, square resize strategies, LLaVA-NeXT AnyRes tiling and token accounting.

Over 400 lines: decoding limits, the four resize modes and AnyRes share the geometry helpers (sizes, grids,
token counts) that the box mapping and the processor also use.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmkit.log import get_logger

logger = get_logger(__name__)

IMAGE_ERROR_REASONS = ("missing_file", "empty_file", "corrupt", "truncated", "too_large", "too_many_pixels")
RESIZE_STRATEGIES = ("resize", "pad", "crop")
# `pad` builds the padded square at the original resolution (as LLaVA-1.5 and transformers do) up to this many
# pixels; beyond it (extreme aspect ratios) the content is resized first, so no huge canvas is ever allocated
PAD_CANVAS_MAX_PIXELS = 64_000_000

XYXY = tuple[float, float, float, float]

_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An image that cannot (or must not) be decoded; `reason` is one of `IMAGE_ERROR_REASONS`."""

    def __init__(self, reason: str, message: str = "", *, source: str | None = None) -> None:
        if reason not in IMAGE_ERROR_REASONS:
            raise ValueError(f"unknown ImageError reason {reason!r}; known: {', '.join(IMAGE_ERROR_REASONS)}")
        self.reason = reason
        self.source = source
        where = f" ({source})" if source else ""
        super().__init__(f"{reason}{where}: {message}" if message else f"{reason}{where}")


# ----------------------------------------------------------------------------------------------- loading


def _read_source(src: str | Path | bytes | bytearray | memoryview, max_bytes: int) -> tuple[bytes, str]:
    """The raw bytes of `src` (size checked before reading a file) and a short name for messages."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        name = "<bytes>"
        if not data:
            raise ImageError("empty_file", "no bytes", source=name)
        if len(data) > max_bytes:
            raise ImageError("too_large", f"{len(data)} bytes > max_bytes={max_bytes}", source=name)
        return data, name
    path = Path(src)
    name = str(path)
    if not path.is_file():
        raise ImageError("missing_file", "no such file", source=name)
    size = os.path.getsize(path)
    if size == 0:
        raise ImageError("empty_file", "file has 0 bytes", source=name)
    if size > max_bytes:
        raise ImageError("too_large", f"{size} bytes > max_bytes={max_bytes}", source=name)
    try:
        return path.read_bytes(), name
    except OSError as exc:  # vanished or unreadable between the checks and the read
        raise ImageError("missing_file", str(exc), source=name) from exc


def _is_truncation(exc: BaseException) -> bool:
    return isinstance(exc, EOFError) or "truncat" in str(exc).lower()


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as exc:  # broken EXIF must not make a decodable image unusable
        logger.debug("ignoring unreadable EXIF: %s", exc)
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """Modes I / I;16* / F → 8-bit L, scaling 16-bit data down instead of clipping it to white."""
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        hi = float(np.nanmax(arr)) if arr.size else 0.0
        arr = arr * 255.0 if hi <= 1.0 else arr
    elif arr.size and int(arr.max()) > 255:
        arr = arr.astype(np.float64) / 257.0  # 16-bit range → 8-bit range
    return Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode → RGB; transparency (RGBA, LA, PA, palette with transparency) is composited on `background`."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if img.mode == "RGB" and not has_alpha:
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        img = _high_bit_depth_to_l(img)
    elif has_alpha:
        if img.mode == "La":  # premultiplied; PIL converts it only to LA
            img = img.convert("LA")
        img = img.convert("RGBA")  # palette / L / RGB transparency keys become an alpha channel
    if img.mode == "RGBA":
        canvas = Image.new("RGBA", img.size, (*background, 255))
        canvas.alpha_composite(img)
        return canvas.convert("RGB")
    return img.convert("RGB")


def load_image(
    src: str | Path | bytes,
    *,
    max_pixels: int = 64_000_000,
    max_bytes: int = 32 * 2**20,
    background: tuple[int, int, int] = (255, 255, 255),
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """Decode `src` into a fully loaded RGB image, checking byte size and pixel count before decoding.

    EXIF orientation is applied; alpha is composited on `background`. `formats` (PIL names, e.g. "PNG") limits
    which decoders may be tried (None: any PIL knows). Raises `ImageError` (never a bare PIL error) with
    `reason` in `IMAGE_ERROR_REASONS`.
    """
    data, name = _read_source(src, max_bytes)
    # Our max_pixels check below is authoritative; PIL's own bomb warning is silenced, its hard error mapped.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=list(formats) if formats is not None else None)
        except Image.DecompressionBombError as exc:
            raise ImageError("too_many_pixels", str(exc), source=name) from exc
        except UnidentifiedImageError as exc:
            raise ImageError("corrupt", "not a recognised image", source=name) from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(
                "truncated" if _is_truncation(exc) else "corrupt", str(exc), source=name
            ) from exc
        width, height = img.size  # header only: nothing decoded yet
        if width <= 0 or height <= 0:
            raise ImageError("corrupt", f"invalid size {width}x{height}", source=name)
        if width * height > max_pixels:
            raise ImageError("too_many_pixels", f"{width}x{height} > max_pixels={max_pixels}", source=name)
        try:
            img.load()
        except Image.DecompressionBombError as exc:
            raise ImageError("too_many_pixels", str(exc), source=name) from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(
                "truncated" if _is_truncation(exc) else "corrupt", str(exc), source=name
            ) from exc
    img = _apply_exif_orientation(img)
    return to_rgb(img, background)


# ------------------------------------------------------------------------------------- square resizing


@dataclass
class ImageTransform:
    """How original pixel coordinates (W, H) map to model-input coordinates: x' = x * scale_x + offset_x.

    Coordinates are continuous pixel-edge coordinates (pixel i spans [i, i+1)), as PIL's resize uses.
    """

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    out_size: tuple[int, int]  # (width, height) of the model input
    orig_size: tuple[int, int]  # (width, height) of the original image

    def apply_xy(self, x: float, y: float) -> tuple[float, float]:
        """Original → model-input coordinates."""
        return x * self.scale_x + self.offset_x, y * self.scale_y + self.offset_y

    def invert_xy(self, x: float, y: float) -> tuple[float, float]:
        """Model-input → original coordinates."""
        return (x - self.offset_x) / self.scale_x, (y - self.offset_y) / self.scale_y

    def apply_box(self, box: XYXY, clip: bool = True) -> XYXY:
        """An (x1, y1, x2, y2) box on the original → on the model input (clipped to `out_size`)."""
        x1, y1 = self.apply_xy(box[0], box[1])
        x2, y2 = self.apply_xy(box[2], box[3])
        return _clip_xyxy((x1, y1, x2, y2), self.out_size) if clip else (x1, y1, x2, y2)

    def invert_box(self, box: XYXY, clip: bool = True) -> XYXY:
        """An (x1, y1, x2, y2) box on the model input → on the original (clipped to `orig_size`)."""
        x1, y1 = self.invert_xy(box[0], box[1])
        x2, y2 = self.invert_xy(box[2], box[3])
        return _clip_xyxy((x1, y1, x2, y2), self.orig_size) if clip else (x1, y1, x2, y2)


def _clip_xyxy(box: XYXY, size: tuple[int, int]) -> XYXY:
    w, h = size
    x1, x2 = sorted((box[0], box[2]))
    y1, y2 = sorted((box[1], box[3]))
    return (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))


def image_mean_color(mean: Sequence[float]) -> tuple[int, int, int]:
    """The normalisation mean as an 8-bit RGB fill colour, as LLaVA-1.5 pads: int(m * 255) per channel."""
    if len(mean) != 3:
        raise ValueError(f"image mean must have 3 channels, got {len(mean)}")
    r, g, b = (int(m * 255) for m in mean)
    return r, g, b


def square_transform(orig_size: tuple[int, int], size: int, strategy: str = "resize") -> ImageTransform:
    """The `ImageTransform` that `resize_image` applies to an image of `orig_size`, from sizes alone."""
    if strategy not in RESIZE_STRATEGIES:
        raise ValueError(f"unknown resize strategy {strategy!r}; known: {', '.join(RESIZE_STRATEGIES)}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    w, h = orig_size
    if strategy == "resize":
        return ImageTransform(size / w, size / h, 0.0, 0.0, (size, size), (w, h))
    if strategy == "pad":
        side = max(w, h)
        if side * side <= PAD_CANVAS_MAX_PIXELS:  # expand2square, then resize the square
            scale = size / side
            left, top = (side - w) // 2, (side - h) // 2
            return ImageTransform(scale, scale, left * scale, top * scale, (size, size), (w, h))
        new_w, new_h = _letterbox_size((w, h), size)  # a huge canvas: resize first, then pad
        left, top = (size - new_w) // 2, (size - new_h) // 2
        return ImageTransform(new_w / w, new_h / h, float(left), float(top), (size, size), (w, h))
    side = min(w, h)  # crop: the centred side×side window of the original
    scale = size / side
    return ImageTransform(
        scale, scale, -(w - side) / 2 * scale, -(h - side) / 2 * scale, (size, size), (w, h)
    )


def _letterbox_size(orig_size: tuple[int, int], size: int) -> tuple[int, int]:
    w, h = orig_size
    scale = size / max(w, h)
    return max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))


def resize_image(
    img: Image.Image,
    size: int,
    strategy: str = "resize",
    fill: tuple[int, int, int] = (127, 127, 127),
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> tuple[Image.Image, ImageTransform]:
    """Make a `size`×`size` model input and the transform from original to input coordinates.

    - `resize`: stretch to the square (aspect ratio not kept);
    - `pad`: letterbox — LLaVA-1.5's `expand2square`: centre the image on a `fill` square of its long side
      (fill = `image_mean_color(mean)`), then resize the square to `size` (as transformers'
      `LlavaImageProcessor(do_pad=True)`, pixel for pixel). Only when that square would exceed
      `PAD_CANVAS_MAX_PIXELS` (extreme aspect ratios) is the content resized first and then padded;
    - `crop`: scale the short side to `size`, centre-crop the long side (CLIP preprocessing).
    """
    img = to_rgb(img)
    tf = square_transform(img.size, size, strategy)
    w, h = img.size
    if strategy == "resize":
        return img.resize((size, size), resample), tf
    if strategy == "pad":
        side = max(w, h)
        if side * side <= PAD_CANVAS_MAX_PIXELS:
            canvas = Image.new("RGB", (side, side), tuple(fill))
            canvas.paste(img, ((side - w) // 2, (side - h) // 2))
            return canvas.resize((size, size), resample), tf
        canvas = Image.new("RGB", (size, size), tuple(fill))
        canvas.paste(
            img.resize(_letterbox_size((w, h), size), resample), (int(tf.offset_x), int(tf.offset_y))
        )
        return canvas, tf
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return img.resize((size, size), resample, box=box), tf


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB image → float32 tensor [3, H, W], (pixel / 255 - mean) / std per channel."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 channels, got {len(mean)} and {len(std)}")
    arr = np.asarray(to_rgb(img), dtype=np.float32) / 255.0  # [H, W, 3]
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # [3, H, W]


# ------------------------------------------------------------------------------------------------ AnyRes


def select_best_resolution(orig_size: tuple[int, int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """LLaVA-NeXT: the (width, height) candidate maximising effective resolution, then minimising waste."""
    if not candidates:
        raise ValueError("select_best_resolution needs at least one candidate resolution")
    ow, oh = orig_size
    best: tuple[int, int] | None = None
    best_effective, best_wasted = -1, math.inf
    for cw, ch in candidates:
        scale = min(cw / ow, ch / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        effective = min(dw * dh, ow * oh)
        wasted = cw * ch - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(cw), int(ch)), effective, wasted
    assert best is not None
    return best


def _check_pinpoints(grid_pinpoints: list[tuple[int, int]], tile_size: int) -> None:
    for w, h in grid_pinpoints:
        if w <= 0 or h <= 0 or w % tile_size or h % tile_size:
            raise ValueError(f"grid pinpoint {(w, h)} is not a positive multiple of tile_size={tile_size}")


def _fit_in_canvas(orig_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int, int, int]:
    """LLaVA-NeXT `resize_and_pad_image` geometry: (new_w, new_h, paste_x, paste_y)."""
    ow, oh = orig_size
    tw, th = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        new_w, new_h = tw, min(math.ceil(oh * sw), th)
    else:
        new_w, new_h = min(math.ceil(ow * sh), tw), th
    new_w, new_h = max(1, new_w), max(1, new_h)
    return new_w, new_h, (tw - new_w) // 2, (th - new_h) // 2


@dataclass
class AnyResLayout:
    """Where an AnyRes image went: tiles[0] is the global view, tiles[1 + r * cols + c] the grid tile (r, c)."""

    orig_size: tuple[int, int]  # (width, height) of the original
    resolution: tuple[int, int]  # chosen (width, height) grid canvas
    cols: int
    rows: int
    tile_size: int
    global_transform: ImageTransform  # original → global view (tile_size × tile_size)
    grid_transform: ImageTransform  # original → grid canvas (`resolution`, letterboxed)

    @property
    def num_tiles(self) -> int:
        """Tiles fed to the vision tower, global view included (tokens = num_tiles * tokens_per_tile)."""
        return self.cols * self.rows + 1

    def unpadded_cells(self, grid: int) -> tuple[int, int, int, int]:
        """LLaVA-NeXT's unpadding of the tile grid's feature map, `grid`×`grid` cells per tile: the (top, left,
        height, width) window of the (rows·grid)×(cols·grid) map that holds the image rather than the black
        padding (as transformers' `unpad_image`: a symmetric cut in whole cells, rounded as there)."""
        ow, oh = self.orig_size
        height, width = self.rows * grid, self.cols * grid
        if ow / oh > width / height:  # wider than the grid: padding above and below
            pad = (height - int(round(oh * (width / ow), 7))) // 2
            return pad, 0, height - 2 * pad, width
        pad = (width - int(round(ow * (height / oh), 7))) // 2
        return 0, pad, height, width - 2 * pad

    def llava_next_tokens(self, grid: int) -> int:
        """Visual tokens of this image under the `llava_next` layout (`grid`×`grid` tokens per tile): the
        global view's grid², then each row of the unpadded grid map followed by one `image_newline`."""
        _, _, height, width = self.unpadded_cells(grid)
        return grid * grid + height * (width + 1)

    def box_to_global(self, box: XYXY) -> XYXY:
        """A box on the original → on the global view."""
        return self.global_transform.apply_box(box)

    def box_to_grid(self, box: XYXY) -> XYXY:
        """A box on the original → on the whole grid canvas."""
        return self.grid_transform.apply_box(box)

    def box_to_tiles(self, box: XYXY) -> list[tuple[int, XYXY]]:
        """The grid tiles a box on the original overlaps: (index into the tile list, box in tile pixels)."""
        gx1, gy1, gx2, gy2 = self.box_to_grid(box)
        t = self.tile_size
        out: list[tuple[int, XYXY]] = []
        for r in range(self.rows):
            for c in range(self.cols):
                x1, y1 = max(gx1, c * t), max(gy1, r * t)
                x2, y2 = min(gx2, (c + 1) * t), min(gy2, (r + 1) * t)
                if x2 > x1 and y2 > y1:
                    out.append((1 + r * self.cols + c, (x1 - c * t, y1 - r * t, x2 - c * t, y2 - r * t)))
        return out


def anyres_layout(
    orig_size: tuple[int, int],
    grid_pinpoints: list[tuple[int, int]],
    tile_size: int,
    strategy: str = "resize",
) -> AnyResLayout:
    """The AnyRes geometry for an image of `orig_size` (width, height) without touching pixels."""
    _check_pinpoints(grid_pinpoints, tile_size)
    ow, oh = orig_size
    res = select_best_resolution(orig_size, grid_pinpoints)
    new_w, new_h, px, py = _fit_in_canvas(orig_size, res)
    grid_tf = ImageTransform(new_w / ow, new_h / oh, float(px), float(py), res, (ow, oh))
    global_tf = square_transform((ow, oh), tile_size, strategy)
    return AnyResLayout(
        (ow, oh), res, res[0] // tile_size, res[1] // tile_size, tile_size, global_tf, grid_tf
    )


def anyres_tiles(
    img: Image.Image,
    grid_pinpoints: list[tuple[int, int]],
    tile_size: int,
    strategy: str = "resize",
    fill: tuple[int, int, int] = (0, 0, 0),
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> tuple[list[Image.Image], AnyResLayout]:
    """LLaVA-NeXT AnyRes: [global view] + row-major `tile_size` tiles of the best-fit grid canvas.

    The canvas is the image resized to fit the chosen resolution and centred on `fill` (black, as
    LLaVA-NeXT's `resize_and_pad_image`); the global view uses `resize_image(..., strategy)`.
    """
    img = to_rgb(img)
    layout = anyres_layout(img.size, grid_pinpoints, tile_size, strategy)
    new_w, new_h, px, py = _fit_in_canvas(img.size, layout.resolution)
    canvas = Image.new("RGB", layout.resolution, tuple(fill))
    canvas.paste(img.resize((new_w, new_h), resample), (px, py))
    global_view, _ = resize_image(img, tile_size, strategy, fill=tuple(fill), resample=resample)
    tiles = [global_view]
    for r in range(layout.rows):
        for c in range(layout.cols):
            x, y = c * tile_size, r * tile_size
            tiles.append(canvas.crop((x, y, x + tile_size, y + tile_size)))
    return tiles, layout


def anyres_num_tiles(
    orig_size: tuple[int, int], grid_pinpoints: list[tuple[int, int]], tile_size: int
) -> int:
    """How many tiles `anyres_tiles` yields for an image of `orig_size` (width, height), global view included."""
    _check_pinpoints(grid_pinpoints, tile_size)
    w, h = select_best_resolution(orig_size, grid_pinpoints)
    return (w // tile_size) * (h // tile_size) + 1


# ------------------------------------------------------------------------------------- token accounting


def gpt4v_image_tokens(width: int, height: int, detail: str = "high") -> int:
    """OpenAI GPT-4V/4o image token cost: low = 85; high = 85 + 170 per 512-px tile after resizing.

    High detail: fit within 2048×2048, then downscale so the shortest side is at most 768 (never upscale).
    E.g. 512×512 → 255, 1024×1024 → 765, 2048×4096 → 1105. `auto` is counted as high.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if detail == "low":
        return 85
    if detail not in ("high", "auto"):
        raise ValueError(f"unknown detail {detail!r}; known: low, high, auto")
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = max(1, int(w * s)), max(1, int(h * s))
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = max(1, int(w * s)), max(1, int(h * s))
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return 170 * tiles + 85
