"""Bounding boxes in pixel coordinates, their text formats (Qwen-VL, Kosmos-2, Shikra, pixel) and a tolerant parser."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from vlmkit.data.images import AnyResLayout, ImageTransform

GROUNDING_FORMATS = ("qwen", "kosmos", "shikra", "pixel")

QWEN_BINS = 1000  # Qwen-VL: integer coordinates in [0, 1000)
KOSMOS_BINS = 32  # Kosmos-2: a 32×32 grid of location tokens


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel-edge coordinates of some image: (x1, y1) top-left, (x2, y2) bottom-right."""

    x1: float
    y1: float
    x2: float
    y2: float

    @classmethod
    def from_xywh(cls, x: float, y: float, w: float, h: float) -> Box:
        return cls(x, y, x + w, y + h)

    def to_xywh(self) -> tuple[float, float, float, float]:
        return self.x1, self.y1, self.x2 - self.x1, self.y2 - self.y1

    def to_xyxy(self) -> tuple[float, float, float, float]:
        return self.x1, self.y1, self.x2, self.y2

    @property
    def width(self) -> float:
        return max(0.0, self.x2 - self.x1)

    @property
    def height(self) -> float:
        return max(0.0, self.y2 - self.y1)

    def area(self) -> float:
        return self.width * self.height

    def normalized(self) -> Box:
        """The same box with corners ordered so that x1 <= x2 and y1 <= y2."""
        return Box(min(self.x1, self.x2), min(self.y1, self.y2), max(self.x1, self.x2), max(self.y1, self.y2))

    def clip(self, w: float, h: float) -> Box:
        """Corners ordered and clamped into [0, w] × [0, h]."""
        b = self.normalized()
        return Box(_clamp(b.x1, 0, w), _clamp(b.y1, 0, h), _clamp(b.x2, 0, w), _clamp(b.y2, 0, h))

    def iou(self, other: Box) -> float:
        """Intersection over union (0.0 when both are empty)."""
        iw = min(self.x2, other.x2) - max(self.x1, other.x1)
        ih = min(self.y2, other.y2) - max(self.y1, other.y1)
        inter = max(0.0, iw) * max(0.0, ih)
        union = self.area() + other.area() - inter
        return inter / union if union > 0 else 0.0


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")


# --------------------------------------------------------------------------------------------- formatting


def _qwen_bin(v: float, size: int) -> int:
    return int(_clamp(math.floor(v / size * QWEN_BINS), 0, QWEN_BINS - 1))


def kosmos_patch_indices(box: Box, width: int, height: int) -> tuple[int, int]:
    """Kosmos-2 location tokens: (index of the top-left cell, index of the bottom-right cell), row * 32 + col."""
    n = KOSMOS_BINS
    b = box.clip(width, height)
    ul_x = int(_clamp(math.floor(b.x1 / width * n), 0, n - 1))
    ul_y = int(_clamp(math.floor(b.y1 / height * n), 0, n - 1))
    lr_x = int(_clamp(math.ceil(b.x2 / width * n - 1), ul_x, n - 1))
    lr_y = int(_clamp(math.ceil(b.y2 / height * n - 1), ul_y, n - 1))
    return ul_y * n + ul_x, lr_y * n + lr_x


def kosmos_box_from_indices(ul: int, lr: int, width: int, height: int) -> Box:
    """Kosmos-2 decoding (`patch_index_to_coordinate`): cell edges for one row/column, else cell centres."""
    n = KOSMOS_BINS
    ul, lr = int(_clamp(ul, 0, n * n - 1)), int(_clamp(lr, 0, n * n - 1))
    ul_x, ul_y, lr_x, lr_y = ul % n, ul // n, lr % n, lr // n
    ul_x, lr_x = min(ul_x, lr_x), max(ul_x, lr_x)
    ul_y, lr_y = min(ul_y, lr_y), max(ul_y, lr_y)
    cell = 1.0 / n
    if ul_x == lr_x or ul_y == lr_y:
        x1, y1, x2, y2 = ul_x * cell, ul_y * cell, (lr_x + 1) * cell, (lr_y + 1) * cell
    else:
        x1, y1 = (ul_x + 0.5) * cell, (ul_y + 0.5) * cell
        x2, y2 = (lr_x + 0.5) * cell, (lr_y + 0.5) * cell
    return Box(x1 * width, y1 * height, x2 * width, y2 * height)


def format_box(box: Box, fmt: str, width: int, height: int, ref: str | None = None) -> str:
    """`box` (pixels of a `width`×`height` image) as text in grounding format `fmt`, optionally with its phrase.

    qwen: `<ref>a dog</ref><box>(120,300),(500,810)</box>`; kosmos: `<p>a dog</p><box><loc_300><loc_822></box>`;
    shikra: `a dog [0.120,0.300,0.500,0.810]`; pixel: `a dog [120, 300, 500, 810]`.
    """
    _check_size(width, height)
    b = box.clip(width, height)
    if fmt == "qwen":
        coords = (
            _qwen_bin(b.x1, width),
            _qwen_bin(b.y1, height),
            _qwen_bin(b.x2, width),
            _qwen_bin(b.y2, height),
        )
        body = "<box>({},{}),({},{})</box>".format(*coords)
        return f"<ref>{ref}</ref>{body}" if ref is not None else body
    if fmt == "kosmos":
        ul, lr = kosmos_patch_indices(b, width, height)
        body = f"<box><loc_{ul}><loc_{lr}></box>"
        return f"<p>{ref}</p>{body}" if ref is not None else body
    if fmt == "shikra":
        vals = (b.x1 / width, b.y1 / height, b.x2 / width, b.y2 / height)
        body = "[" + ",".join(f"{v:.3f}" for v in vals) + "]"
    elif fmt == "pixel":
        body = "[" + ", ".join(str(round(v)) for v in b.to_xyxy()) + "]"
    else:
        raise ValueError(f"unknown grounding format {fmt!r}; known: {', '.join(GROUNDING_FORMATS)}")
    return f"{ref} {body}" if ref else body


# ------------------------------------------------------------------------------------------------ parsing

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NUM_RE = re.compile(_NUM)
_LOC_RE = re.compile(r"<\s*(?:loc|patch_index)_?\s*(\d+)\s*>", re.IGNORECASE)
# one open tag: a phrase (<ref>, <p>, <phrase>) or a box (<box>, <object>)
_TAG_RE = re.compile(r"<\s*(ref|p|phrase|box|object)\s*>", re.IGNORECASE)
_CLOSE_RE = re.compile(r"<\s*/\s*(ref|p|phrase|box|object)\s*>", re.IGNORECASE)
_BRACKET_RE = re.compile(
    rf"[\[(]\s*({_NUM})\s*[,;\s]\s*({_NUM})\s*[,;\s]\s*({_NUM})\s*[,;\s]\s*({_NUM})\s*[\])]"
)
_CLAUSE_SPLIT_RE = re.compile(r"[.;:!?\n,()\[\]]")
# Qwen2-VL style special tokens, mapped onto the Qwen-VL tags before parsing
_ALIASES = (
    ("<|object_ref_start|>", "<ref>"),
    ("<|object_ref_end|>", "</ref>"),
    ("<|box_start|>", "<box>"),
    ("<|box_end|>", "</box>"),
)

_PHRASE_TAGS = ("ref", "p", "phrase")


def _box_body_end(text: str, start: int) -> int:
    """Where a box body starting at `start` ends: its close tag, the next open tag, a newline, or the end."""
    ends = [len(text)]
    for m in (_CLOSE_RE.search(text, start), _TAG_RE.search(text, start)):
        if m:
            ends.append(m.start())
    nl = text.find("\n", start)
    if nl >= 0:
        ends.append(nl)
    return min(ends)


def _parse_tagged(
    text: str, fmt: str | None, width: int, height: int
) -> tuple[list[tuple[int, str | None, Box]], list[tuple[int, int]]]:
    """Boxes in `<box>`/`<object>` tags (qwen numbers or kosmos loc tokens) and the spans they cover."""
    found: list[tuple[int, str | None, Box]] = []
    spans: list[tuple[int, int]] = []
    ref: str | None = None
    ref_end = 0  # where the text after the last phrase or box begins
    pos = 0
    while (m := _TAG_RE.search(text, pos)) is not None:
        tag = m.group(1).lower()
        if tag in _PHRASE_TAGS:
            close = _CLOSE_RE.search(text, m.end())
            nxt = _TAG_RE.search(text, m.end())
            end = min(c.start() for c in (close, nxt) if c is not None) if (close or nxt) else len(text)
            ref = text[m.end() : end].strip() or None
            pos = close.end() if close is not None and (nxt is None or close.start() <= nxt.start()) else end
            ref_end = pos
            continue
        if text[ref_end : m.start()].strip():  # prose between the phrase and this box: the phrase is stale
            ref = None
        end = _box_body_end(text, m.end())
        body = text[m.end() : end]
        close = _CLOSE_RE.match(text, end)
        pos = close.end() if close is not None else max(end, m.end())
        spans.append((m.start(), pos))
        ref_end = pos
        for box in _decode_body(body, fmt, width, height):
            found.append((m.start(), ref, box))
    return found, spans


def _decode_body(body: str, fmt: str | None, width: int, height: int) -> list[Box]:
    locs = [int(v) for v in _LOC_RE.findall(body)]
    if locs and fmt in (None, "kosmos"):  # pairs: several boxes may share one <object>
        return [kosmos_box_from_indices(a, b, width, height) for a, b in zip(locs[::2], locs[1::2])]
    if locs or fmt not in (None, "qwen"):
        return []
    nums = [float(v) for v in _NUM_RE.findall(body)]
    if len(nums) < 4:
        return []
    x1, y1, x2, y2 = (_clamp(v, 0, QWEN_BINS) for v in nums[:4])
    return [
        Box(x1 / QWEN_BINS * width, y1 / QWEN_BINS * height, x2 / QWEN_BINS * width, y2 / QWEN_BINS * height)
    ]


def _bracket_ref(prefix: str) -> str | None:
    """The phrase a bracketed box follows: the last clause of the text before it."""
    clause = _CLAUSE_SPLIT_RE.split(prefix)[-1].strip()
    return clause or None


def _parse_brackets(
    text: str, fmt: str | None, width: int, height: int, skip: list[tuple[int, int]]
) -> list[tuple[int, str | None, Box]]:
    found: list[tuple[int, str | None, Box]] = []
    prev_end = 0
    for m in _BRACKET_RE.finditer(text):
        if any(a <= m.start() < b for a, b in skip):
            continue
        raw = [float(v) for v in m.groups()]
        kind = fmt
        if kind is None:  # normalised floats → shikra; anything else → pixels
            is_float = any(("." in v or "e" in v.lower()) for v in m.groups())
            kind = "shikra" if is_float and all(abs(v) <= 1.0 for v in raw) else "pixel"
        if kind == "shikra":
            x1, y1, x2, y2 = (_clamp(v, 0.0, 1.0) for v in raw)
            box = Box(x1 * width, y1 * height, x2 * width, y2 * height)
        elif kind == "pixel":
            box = Box(*raw)
        else:
            continue
        start = max(prev_end, max((b for a, b in skip if b <= m.start()), default=0))
        found.append((m.start(), _bracket_ref(text[start : m.start()]), box))
        prev_end = m.end()
    return found


def parse_boxes(text: str, fmt: str | None, width: int, height: int) -> list[tuple[str | None, Box]]:
    """Every box in (model-generated) `text` as (phrase or None, Box in pixels of a `width`×`height` image).

    Tolerant: `fmt=None` tries all formats; spaces, a missing `</ref>` / `</box>`, missing parentheses,
    brackets inside `<box>`, swapped corners and out-of-range values are accepted (corners ordered,
    values clamped to the image); malformed fragments are skipped, never raised on.
    """
    _check_size(width, height)
    if fmt is not None and fmt not in GROUNDING_FORMATS:
        raise ValueError(f"unknown grounding format {fmt!r}; known: {', '.join(GROUNDING_FORMATS)}")
    if not text:
        return []
    for alias, tag in _ALIASES:
        text = text.replace(alias, tag)
    found: list[tuple[int, str | None, Box]] = []
    spans: list[tuple[int, int]] = []
    if fmt in (None, "qwen", "kosmos"):
        found, spans = _parse_tagged(text, fmt, width, height)
    if fmt in (None, "shikra", "pixel"):
        found += _parse_brackets(text, fmt, width, height, spans)
    found.sort(key=lambda item: item[0])
    return [(ref, box.clip(width, height)) for _, ref, box in found]


# ---------------------------------------------------------------------------------------- coordinate maps


def _as_transform(transform: ImageTransform | AnyResLayout) -> ImageTransform:
    return transform.global_transform if isinstance(transform, AnyResLayout) else transform


def box_to_model_input(box: Box, transform: ImageTransform | AnyResLayout) -> Box:
    """A box on the original image → the same region on the model input (for AnyRes: the global view)."""
    return Box(*_as_transform(transform).apply_box(box.to_xyxy()))


def box_to_original(box: Box, transform: ImageTransform | AnyResLayout) -> Box:
    """A box on the model input (for AnyRes: the global view) → the same region on the original image."""
    return Box(*_as_transform(transform).invert_box(box.to_xyxy()))


# ------------------------------------------------------------------------------------- boxes in training text
_QWEN_BOX_RE = re.compile(
    rf"(<\s*box\s*>)\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*(<\s*/\s*box\s*>)",
    re.IGNORECASE,
)
_LOC_PAIR_RE = re.compile(
    r"<\s*(loc|patch_index)_?\s*(\d+)\s*>\s*<\s*(?:loc|patch_index)_?\s*(\d+)\s*>", re.IGNORECASE
)


def rewrite_boxes(
    text: str,
    fmt: str,
    src_size: tuple[int, int],
    dst_size: tuple[int, int],
    move: Callable[[Box], Box],
) -> str:
    """Every box written in `text` in grounding format `fmt` for a `src_size` (width, height) image, moved by
    `move` (pixels of that image -> pixels of the `dst_size` image) and written again, in the same format and
    spelling, for the `dst_size` image; everything else in `text` is kept as it is."""
    if fmt not in GROUNDING_FORMATS:
        raise ValueError(f"unknown grounding format {fmt!r}; known: {', '.join(GROUNDING_FORMATS)}")
    (sw, sh), (dw, dh) = src_size, dst_size
    _check_size(sw, sh)
    _check_size(dw, dh)

    def dst(box: Box) -> Box:
        return move(box.clip(sw, sh)).clip(dw, dh)

    def bin_(
        v: float, size: int, n: int
    ) -> int:  # floor, robust to the float error of scaling there and back
        return int(_clamp(math.floor(v / size * n + 1e-6), 0, n - 1))

    if fmt == "qwen":

        def qwen(m: re.Match[str]) -> str:
            x1, y1, x2, y2 = (_clamp(float(v), 0, QWEN_BINS) / QWEN_BINS for v in m.groups()[1:5])
            b = dst(Box(x1 * sw, y1 * sh, x2 * sw, y2 * sh))
            bins = (
                bin_(b.x1, dw, QWEN_BINS),
                bin_(b.y1, dh, QWEN_BINS),
                bin_(b.x2, dw, QWEN_BINS),
                bin_(b.y2, dh, QWEN_BINS),
            )
            return m.group(1) + "({},{}),({},{})".format(*bins) + m.group(6)

        return _QWEN_BOX_RE.sub(qwen, text)
    if fmt == "kosmos":

        def kosmos(m: re.Match[str]) -> str:
            b, n = dst(kosmos_box_from_indices(int(m[2]), int(m[3]), sw, sh)), KOSMOS_BINS
            ul_x, ul_y = bin_(b.x1, dw, n), bin_(b.y1, dh, n)
            lr_x = int(_clamp(math.ceil(b.x2 / dw * n - 1 - 1e-6), ul_x, n - 1))
            lr_y = int(_clamp(math.ceil(b.y2 / dh * n - 1 - 1e-6), ul_y, n - 1))
            ul, lr = ul_y * n + ul_x, lr_y * n + lr_x
            if m[1].lower() == "patch_index":
                return f"<patch_index_{ul:04d}><patch_index_{lr:04d}>"
            return f"<loc_{ul}><loc_{lr}>"

        return _LOC_PAIR_RE.sub(kosmos, text)

    def bracket(m: re.Match[str]) -> str:
        raw = [float(v) for v in m.groups()]
        if fmt == "shikra":
            x1, y1, x2, y2 = (_clamp(v, 0.0, 1.0) for v in raw)
            b = dst(Box(x1 * sw, y1 * sh, x2 * sw, y2 * sh))
            return "[" + ",".join(f"{v:.3f}" for v in (b.x1 / dw, b.y1 / dh, b.x2 / dw, b.y2 / dh)) + "]"
        b = dst(Box(*raw))
        return "[" + ", ".join(str(round(v)) for v in b.to_xyxy()) + "]"

    return _BRACKET_RE.sub(bracket, text)


def boxes_to_model_input_text(text: str, fmt: str, transform: ImageTransform | AnyResLayout) -> str:
    """`text` with every box written for the original image rewritten for the model input (for AnyRes: the
    global view), as a model is taught to answer (the inverse of `box_to_original` on the way out)."""
    tf = _as_transform(transform)
    return rewrite_boxes(text, fmt, tf.orig_size, tf.out_size, lambda box: box_to_model_input(box, tf))
