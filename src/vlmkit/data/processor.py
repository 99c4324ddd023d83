"""Processor: the one object that turns conversations and images into model inputs, for training and inference.

Built from the model config's `processor` section, the tokenizer and the tower's geometry (numbers only, so
it needs no model and pickles into data-loader workers). Training (`VLMDataset`), `chat`, `serve`, `eval`
and export all go through it; it is saved beside the model (`processor_config.json` + tokenizer files).
Padding is not its job: the collator pads.

Over 400 lines: it is the one place inputs are built (chat rendering, placeholders, pixels, tiles, boxes,
save/load) — the point of it is that this is not split across modules again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmkit import __version__
from vlmkit.config import ProcessorConfig, from_dict, to_dict
from vlmkit.constants import IMAGE_MARKER
from vlmkit.data.formats import Message, Sample
from vlmkit.data.grounding import (
    Box,
    box_to_model_input,
    box_to_original,
    boxes_to_model_input_text,
    parse_boxes,
)
from vlmkit.data.images import (
    AnyResLayout,
    ImageTransform,
    anyres_layout,
    anyres_tiles,
    image_mean_color,
    load_image,
    resize_image,
    square_transform,
    to_tensor,
)
from vlmkit.data.prompts import EncodedSample, _as_message, encode_sample, render_prompt
from vlmkit.templates import resolve_template

PROCESSOR_NAME = "processor_config.json"
RESIZE_MODES = ("resize", "pad", "crop", "anyres")
ANYRES_LAYOUTS = ("tiles", "llava_next")

Layout = ImageTransform | AnyResLayout  # where an original image's pixels went in the model input


class ImageTokenMismatchError(ValueError):
    """Placeholder tokens in the text do not match the visual tokens the images yield."""


@dataclass(frozen=True)
class VisionGeometry:
    """What the processor needs to know of the vision tower and bridge, as plain numbers."""

    image_size: int  # the tower's square input side (one tile)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    tokens_per_tile: int = 1  # placeholder tokens one tower input occupies in the text

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.tokens_per_tile <= 0:
            raise ValueError(f"bad vision geometry {self}: image_size and tokens_per_tile must be positive")

    @property
    def token_grid(self) -> int | None:
        """The side of a tile's square token map (tokens_per_tile = side²), None when it is not a square."""
        side = math.isqrt(self.tokens_per_tile)
        return side if side * side == self.tokens_per_tile else None


@dataclass
class ImageProcessor:
    """Decoded image -> pixel tensors [tiles, 3, S, S] for one tower: a square view (`resize` | `pad` | `crop`)
    or AnyRes tiles (global view + the best-fit grid's tiles), normalised with the tower's mean/std.
    `open` decodes within the size limits (header checks before any pixel is decoded)."""

    image_size: int = 64
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    resize: str = "resize"
    anyres_grid: Sequence[Sequence[int]] = ()
    max_pixels: int = 64_000_000
    max_bytes: int = 32 * 2**20

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode '{self.resize}'; known: {', '.join(RESIZE_MODES)}")

    @property
    def grid(self) -> list[tuple[int, int]]:
        """AnyRes candidate resolutions (width, height); default 2x1, 1x2 and 2x2 tiles."""
        s = self.image_size
        return [(int(w), int(h)) for w, h in self.anyres_grid] or [(2 * s, s), (s, 2 * s), (2 * s, 2 * s)]

    def open(self, source: str | Path | bytes) -> Image.Image:
        """The decoded RGB image (raises `ImageError` with a reason when it is unusable or over the limits)."""
        return load_image(source, max_pixels=self.max_pixels, max_bytes=self.max_bytes)

    def layout(self, size: tuple[int, int]) -> Layout:
        """Where an image of `size` (width, height) goes, from its size alone (no pixels touched)."""
        if self.resize == "anyres":
            return anyres_layout(size, self.grid, self.image_size)
        return square_transform(size, self.image_size, self.resize)

    def num_tiles(self, size: tuple[int, int]) -> int:
        """Tower inputs an image of `size` becomes: 1, or its AnyRes tiles (global view included)."""
        layout = self.layout(size)
        return layout.num_tiles if isinstance(layout, AnyResLayout) else 1

    def tensors(self, img: Image.Image) -> torch.Tensor:
        """One decoded image -> pixel tensors [tiles, 3, S, S]."""
        if self.resize == "anyres":
            views, _ = anyres_tiles(img, self.grid, self.image_size)
        else:
            view, _ = resize_image(img, self.image_size, self.resize, fill=image_mean_color(self.mean))
            views = [view]
        return torch.stack([to_tensor(v, self.mean, self.std) for v in views])  # [tiles, 3, S, S]

    def settings(self) -> dict[str, Any]:
        """What decides the pixels the tower sees (for cache fingerprints; not the decode limits)."""
        return {
            "image_size": int(self.image_size),
            "resize": self.resize,
            "mean": [float(x) for x in self.mean],
            "std": [float(x) for x in self.std],
            "anyres_grid": [list(g) for g in self.grid] if self.resize == "anyres" else [],
            # `pad` became expand2square-then-resize (as LLaVA-1.5): features cached before are stale
            **({"pad": "expand2square"} if self.resize == "pad" else {}),
        }


@dataclass
class ChatInputs:
    """One conversation's model inputs before batching (the collator pads): input_ids [T], pixel_values
    [sum tiles, 3, S, S] | None, and the layout of each image (to map boxes back onto the originals)."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    layouts: list[Layout]
    prompt: str  # the text that was tokenized (placeholders expanded)

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each original image (the `llava_next` layout needs them in the model)."""
        return [(int(lay.orig_size[0]), int(lay.orig_size[1])) for lay in self.layouts]

    def item(self) -> dict[str, Any]:
        """The dict `Collator` takes."""
        return {
            "input_ids": self.input_ids,
            "pixel_values": self.pixel_values,
            "image_sizes": self.image_sizes,
        }


class Processor:
    """Chat rendering, placeholder expansion, images -> pixels/tiles and boxes both ways, for one model."""

    def __init__(
        self,
        cfg: ProcessorConfig,
        tokenizer: Any,
        geometry: VisionGeometry,
        image_token: str = IMAGE_MARKER,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.geometry = geometry
        self.image_token = image_token
        self.images = ImageProcessor(
            image_size=geometry.image_size,
            mean=geometry.mean,
            std=geometry.std,
            resize=cfg.resize,
            anyres_grid=[tuple(g) for g in cfg.anyres_grid],
            max_pixels=cfg.max_image_pixels,
            max_bytes=cfg.max_image_bytes,
        )
        resolve_template(tokenizer, cfg.template)  # an unknown template name fails here, not mid-training
        if cfg.anyres_layout not in ANYRES_LAYOUTS:
            raise ValueError(
                f"unknown processor.anyres_layout '{cfg.anyres_layout}'; known: {', '.join(ANYRES_LAYOUTS)}"
            )
        if self.llava_next and geometry.token_grid is None:
            raise ValueError(
                f"processor.anyres_layout 'llava_next' needs a square token map per tile; this model yields "
                f"{geometry.tokens_per_tile} tokens per tile (use a bridge that keeps the patch grid: linear, mlp)"
            )

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(self.image_token))

    @property
    def template(self) -> str:
        return self.cfg.template

    @property
    def system_prompt(self) -> str | None:
        return self.cfg.system_prompt

    @property
    def llava_next(self) -> bool:
        """AnyRes with LLaVA-NeXT's layout: unpadded tile grid + `image_newline` per row (size-dependent)."""
        return self.cfg.resize == "anyres" and self.cfg.anyres_layout == "llava_next"

    def tokens_per_image(self, num_tiles: int = 1) -> int:
        """Placeholder tokens one image of `num_tiles` tower inputs occupies in the text (for layouts where the
        count follows from the tiles; under `llava_next` it depends on the image's size: `image_tokens`)."""
        if self.llava_next:
            raise ValueError("under anyres_layout 'llava_next' an image's token count depends on its size")
        return num_tiles * self.geometry.tokens_per_tile

    def image_tokens(self, layout: Layout) -> int:
        """Placeholder tokens of one image, from where its pixels went (its size alone decides it)."""
        if isinstance(layout, AnyResLayout) and self.llava_next:
            return layout.llava_next_tokens(self.geometry.token_grid or 0)
        tiles = layout.num_tiles if isinstance(layout, AnyResLayout) else 1
        return tiles * self.geometry.tokens_per_tile

    def _counts(
        self, num_tiles: Sequence[int] | None, sizes: Sequence[tuple[int, int]] | None
    ) -> tuple[list[int] | None, list[int] | None]:
        """(tiles, placeholder tokens) of each image, from the images' sizes (or tile counts, where enough)."""
        if sizes is not None:
            layouts = [self.images.layout((int(w), int(h))) for w, h in sizes]
            tiles = [lay.num_tiles if isinstance(lay, AnyResLayout) else 1 for lay in layouts]
            return tiles, [self.image_tokens(lay) for lay in layouts]
        if num_tiles is not None and self.llava_next:
            raise ValueError("anyres_layout 'llava_next' needs the images' sizes, not only their tile counts")
        return (list(num_tiles) if num_tiles is not None else None), None

    # -------------------------------------------------------------------------------------- images
    def pixels(self, img: Image.Image) -> tuple[torch.Tensor, Layout]:
        """A decoded image -> (pixels [tiles, 3, S, S], its layout: original -> model input coordinates)."""
        img = img.convert("RGB")
        return self.images.tensors(img), self.images.layout(img.size)

    # -------------------------------------------------------------------------------------- text
    def encode_training(
        self,
        sample: Sample,
        num_tiles: Sequence[int] | None = None,
        max_length: int | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> EncodedSample:
        """A training sample -> token ids with placeholders expanded and assistant-only labels (later rounds
        dropped to fit `max_length`); raises `SampleError` with a reason when it cannot be used. `sizes`:
        each image's (width, height) (needed by the `llava_next` layout; tile counts follow from them)."""
        tiles, counts = self._counts(num_tiles, sizes)
        if sizes is not None:  # boxes written for the original images -> as the model sees them
            sample = dataclasses.replace(
                sample, messages=self.boxes_to_input_messages(sample.messages, sizes)
            )
        enc = encode_sample(
            sample,
            self.tokenizer,
            image_token=self.image_token,
            tokens_per_image=self.tokens_per_image if counts is None else 1,
            template=self.cfg.template,
            system_prompt=self.cfg.system_prompt,
            max_length=max_length,
            num_tiles=tiles,
            image_tokens=counts,
        )
        if sizes is not None:
            enc.image_sizes = [(int(w), int(h)) for w, h in sizes[: len(enc.images)]]
        return enc

    def render(
        self,
        messages: Sequence[Message | dict[str, Any]],
        num_tiles: Sequence[int] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> str:
        """The exact prompt text of a conversation (generation prompt added, placeholders expanded); each
        image's placeholders from its `sizes` (width, height) or, where that is enough, its tile count."""
        tiles, counts = self._counts(num_tiles, sizes)
        if sizes is not None:
            messages = self.boxes_to_input_messages(messages, sizes)
        return render_prompt(
            messages,
            self.tokenizer,
            template=self.cfg.template,
            add_generation_prompt=True,
            image_token=self.image_token,
            tokens_per_image=self.tokens_per_image if counts is None else 1,
            system_prompt=self.cfg.system_prompt,
            num_tiles=tiles,
            image_tokens=counts,
        )

    def encode_chat(
        self, messages: Sequence[Message | dict[str, Any]], images: Sequence[Image.Image] = ()
    ) -> ChatInputs:
        """A conversation to continue (image parts in order) + its decoded images -> model inputs."""
        encoded = [self.pixels(img) for img in images]
        prompt = self.render(messages, sizes=[lay.orig_size for _, lay in encoded])
        return self._inputs(prompt, encoded)

    def encode_prompt(self, prompt: str, images: Sequence[Image.Image] = ()) -> ChatInputs:
        """An already chat-formatted prompt with one `image_token` marker per image -> model inputs."""
        n = prompt.count(self.image_token)
        if n != len(images):
            raise ImageTokenMismatchError(
                f"prompt has {n} '{self.image_token}' markers but {len(images)} images were given"
            )
        encoded = [self.pixels(img) for img in images]
        pieces = prompt.split(self.image_token)
        text = pieces[0] + "".join(
            self.image_token * self.image_tokens(layout) + piece
            for (_, layout), piece in zip(encoded, pieces[1:])
        )
        return self._inputs(text, encoded)

    def _inputs(self, prompt: str, encoded: Sequence[tuple[torch.Tensor, Layout]]) -> ChatInputs:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        pixels = torch.cat([p for p, _ in encoded]) if encoded else None
        return ChatInputs(torch.tensor(ids, dtype=torch.long), pixels, [lay for _, lay in encoded], prompt)

    def prompt_length(
        self, messages: Sequence[Message | dict[str, Any]], sizes: Sequence[tuple[int, int]] = ()
    ) -> int:
        """Prompt tokens of a conversation, from the images' sizes alone (no pixels processed)."""
        text = self.render(messages, sizes=list(sizes) if sizes else None)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -------------------------------------------------------------------------------------- boxes
    def boxes_to_original(self, text: str, layout: Layout) -> list[tuple[str | None, Box]]:
        """Boxes written in `text` (model-input coordinates, in `grounding_format`) -> on the original image."""
        size = self.geometry.image_size
        found = parse_boxes(text, self.cfg.grounding_format, size, size)
        return [(ref, box_to_original(box, layout)) for ref, box in found]

    def box_to_input(self, box: Box, layout: Layout) -> Box:
        """A box on the original image -> on the model input (what a grounding answer is written in)."""
        return box_to_model_input(box, layout)

    def boxes_to_input_messages(
        self, messages: Sequence[Message | dict[str, Any]], sizes: Sequence[tuple[int, int]]
    ) -> list[Message]:
        """The conversation with every box in its text (written, in `grounding_format`, for the original image
        of `sizes`) rewritten for the model input, through the resize mode's layout (`pad` offsets, `crop`
        window, AnyRes global view): the frame answers are decoded from by `boxes_to_original`. A text part
        refers to the latest image before it (the first image when none precedes it). Unchanged without a
        `grounding_format` (text in an unknown format is not rewritten) or images."""
        msgs = [_as_message(m) for m in messages]
        fmt = self.cfg.grounding_format
        if fmt is None or not sizes:
            return msgs
        layouts = [self.images.layout((int(w), int(h))) for w, h in sizes]
        out, seen = [], 0
        for msg in msgs:
            parts = []
            for part in msg.content:
                if part["type"] == "image":
                    seen += 1
                elif msg.role != "system":
                    layout = layouts[min(max(seen - 1, 0), len(layouts) - 1)]
                    part = {**part, "text": boxes_to_model_input_text(part["text"], fmt, layout)}
                parts.append(part)
            out.append(Message(msg.role, parts))
        return out

    # -------------------------------------------------------------------------------------- save / load
    def to_dict(self) -> dict[str, Any]:
        return {
            "vlmkit_version": __version__,
            "processor": to_dict(self.cfg),
            "geometry": dataclasses.asdict(self.geometry),
            "image_token": self.image_token,
        }

    def save_pretrained(self, out_dir: str | Path, *, tokenizer: bool = True) -> Path:
        """Write `processor_config.json` (and the tokenizer files, unless the caller writes them)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / PROCESSOR_NAME).write_text(json.dumps(self.to_dict(), indent=2))
        if tokenizer:
            self.tokenizer.save_pretrained(out)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], tokenizer: Any) -> Processor:
        geometry = data["geometry"]
        return cls(
            from_dict(ProcessorConfig, data.get("processor") or {}, "processor"),
            tokenizer,
            VisionGeometry(
                int(geometry["image_size"]),
                tuple(geometry["mean"]),
                tuple(geometry["std"]),
                int(geometry["tokens_per_tile"]),
            ),
            data.get("image_token", IMAGE_MARKER),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Processor:
        """The processor saved in a model directory (no model is built). Directories written before
        processor_config.json existed hold no tower geometry: load those with
        `VisionLanguageModel.from_pretrained(dir).processor` (and save again to add the file)."""
        from transformers import AutoTokenizer

        path = Path(model_dir) / PROCESSOR_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{model_dir} has no {PROCESSOR_NAME} (saved by an older vlmkit): build it from the model with "
                "VisionLanguageModel.from_pretrained(dir).processor"
            )
        return cls.from_dict(json.loads(path.read_text()), AutoTokenizer.from_pretrained(model_dir))

    def replace(self, **changes: Any) -> Processor:
        """A copy with some `ProcessorConfig` fields changed (e.g. another template for one evaluation)."""
        return Processor(
            dataclasses.replace(self.cfg, **changes), self.tokenizer, self.geometry, self.image_token
        )
