"""ShapesWorld: a deterministic procedural dataset of colored shapes with LLaVA-format task records.

Over 400 lines: scenes, rendering and the task builders share the scene model; the plugin's other parts
(data config, scoring, hooks, quickstart) are separate modules.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlmkit.data.grounding import Box, format_box
from vlmkit.log import get_logger

logger = get_logger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
# Skewed priors (like object frequencies in COCO) so that POPE's "popular" negatives mean something.
COLOR_WEIGHTS: tuple[float, ...] = (0.25, 0.20, 0.18, 0.15, 0.12, 0.10)
SHAPE_WEIGHTS: tuple[float, ...] = (0.30, 0.25, 0.20, 0.15, 0.10)
# Side of an object's box as a fraction of the image side, per size class.
SIZE_FRACTIONS: dict[str, tuple[float, float]] = {
    "small": (0.16, 0.22),
    "medium": (0.24, 0.30),
    "large": (0.32, 0.40),
}
MIN_SIDE_PX = 7  # below this, triangles/stars/diamonds stop being recognisable
BACKGROUND = (255, 255, 255)

ALL_TASKS: tuple[str, ...] = ("caption", "attribute_qa", "counting", "spatial", "pope", "grounding", "region")
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
DEFAULT_SPLIT = "train"
# Splits are generated in this order and each avoids every scene of the splits before it, so the
# test set depends only on (seed, its size) and never on how large train is.
_SPLIT_PRIORITY = ("test", "val", "validation", "dev")

CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "List the shapes in the image from left to right.",
    "What shapes are in this picture?",
)

_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
_PAIR_WEIGHTS = np.array([cw * sw for cw in COLOR_WEIGHTS for sw in SHAPE_WEIGHTS], dtype=np.float64)
_PAIR_WEIGHTS /= _PAIR_WEIGHTS.sum()


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object; `box` is [x1, y1, x2, y2] in pixel-edge coordinates (x2, y2 exclusive)."""

    color: str
    shape: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    def to_dict(self) -> dict[str, Any]:
        return {"color": self.color, "shape": self.shape, "size": self.size, "box": list(self.box)}


@dataclass(frozen=True)
class Distractor:
    """A gray line or dot drawn under the objects when noise is on; never counted as an object."""

    kind: str  # "line" or "dot"
    xy: tuple[float, ...]  # line: x1, y1, x2, y2; dot: cx, cy, r
    gray: int


@dataclass(frozen=True)
class Scene:
    """Everything needed to render an image; `objects` are ordered left to right (then top to bottom)."""

    image_size: int
    objects: tuple[ShapeObject, ...]
    noise_seed: int | None = None
    distractors: tuple[Distractor, ...] = field(default_factory=tuple)

    def signature(self) -> tuple:
        """Identity of the scene's content, used to keep splits disjoint."""
        return (self.image_size, tuple((o.color, o.shape, o.box) for o in self.objects))

    def to_meta(self) -> dict[str, Any]:
        return {
            "width": self.image_size,
            "height": self.image_size,
            "objects": [o.to_dict() for o in self.objects],
            "noise": self.noise_seed is not None,
            "distractors": len(self.distractors),
        }


# --------------------------------------------------------------------------------------------- scenes
def _boxes_clear(box: tuple[int, int, int, int], others: list[ShapeObject], gap: int) -> bool:
    x1, y1, x2, y2 = box
    for o in others:
        a1, b1, a2, b2 = o.box
        if x1 < a2 + gap and a1 < x2 + gap and y1 < b2 + gap and b1 < y2 + gap:
            return False
    return True


def _place(
    rng: np.random.Generator, image_size: int, size: str, placed: list[ShapeObject], tries: int = 60
) -> tuple[int, int, int, int] | None:
    lo, hi = SIZE_FRACTIONS[size]
    margin = max(1, round(image_size * 0.02))
    gap = max(2, round(image_size * 0.03))
    for _ in range(tries):
        side = max(MIN_SIDE_PX, round(float(rng.uniform(lo, hi)) * image_size))
        room = image_size - 2 * margin - side
        if room < 0:
            return None
        x1 = margin + int(rng.integers(0, room + 1))
        y1 = margin + int(rng.integers(0, room + 1))
        box = (x1, y1, x1 + side, y1 + side)
        if _boxes_clear(box, placed, gap):
            return box
    return None


def _make_distractors(rng: np.random.Generator, image_size: int) -> tuple[Distractor, ...]:
    out = []
    for _ in range(int(rng.integers(1, 5))):
        gray = int(rng.integers(90, 170))
        if rng.random() < 0.5:
            x1, y1, x2, y2 = (float(v) for v in rng.uniform(0, image_size, size=4))
            out.append(Distractor("line", (x1, y1, x2, y2), gray))
        else:
            cx, cy = (float(v) for v in rng.uniform(0, image_size, size=2))
            out.append(Distractor("dot", (cx, cy, max(1.0, image_size * 0.02)), gray))
    return tuple(out)


def make_scene(
    rng: np.random.Generator, image_size: int = 64, max_objects: int = 3, noise: bool = False
) -> Scene:
    """Sample a scene: 1..max_objects objects with distinct (color, shape) pairs and non-overlapping boxes.

    Objects that cannot be placed (a crowded small image) are dropped, so a scene may hold fewer
    objects than sampled; `Scene.objects` is always the ground truth.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if not 1 <= max_objects <= len(_PAIRS):
        raise ValueError(f"max_objects must be in [1, {len(_PAIRS)}], got {max_objects}")
    n = int(rng.integers(1, max_objects + 1))
    pair_ids = rng.choice(len(_PAIRS), size=n, replace=False, p=_PAIR_WEIGHTS)
    sizes = list(SIZE_FRACTIONS)
    placed: list[ShapeObject] = []
    for pid in pair_ids:
        color, shape = _PAIRS[int(pid)]
        size_idx = int(rng.integers(0, len(sizes)))
        box = None
        for size in reversed(sizes[: size_idx + 1]):  # shrink if the chosen size does not fit
            box = _place(rng, image_size, size, placed)
            if box is not None:
                break
        if box is not None:
            placed.append(ShapeObject(color, shape, size, box))
    if not placed:  # cannot happen for image_size >= 16, but keep the invariant explicit
        raise RuntimeError("could not place any object")
    objects = tuple(sorted(placed, key=lambda o: (o.center, o.color, o.shape)))
    noise_seed = int(rng.integers(0, 2**31 - 1)) if noise else None
    distractors = _make_distractors(rng, image_size) if noise else ()
    return Scene(image_size, objects, noise_seed, distractors)


# --------------------------------------------------------------------------------------------- render
def _star(cx: float, cy: float, r_out: float, r_in: float) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r_out, r_in)
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]


def _shape_polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    if shape == "triangle":
        return [(x1, y2), (x2, y2), (cx, y1)]
    if shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if shape == "star":
        # Outer radius chosen so that the star spans the box vertically (top tip to lower tips).
        r = (y2 - y1) / (1 + np.cos(np.pi / 5))
        return _star(cx, y1 + r, r, 0.45 * r)
    raise ValueError(f"unknown polygon shape {shape!r}")


def _supersample(image_size: int) -> int:
    return max(2, min(4, 512 // image_size))


def render(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image, anti-aliased by supersampling; object interiors keep exact colors."""
    size = scene.image_size
    k = _supersample(size)
    if scene.noise_seed is not None:
        noise_rng = np.random.default_rng(scene.noise_seed)
        gray = noise_rng.normal(235.0, 12.0, size=(size, size)).clip(190, 255).astype(np.uint8)
        canvas = Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB").resize(
            (size * k, size * k), Image.Resampling.NEAREST
        )
    else:
        canvas = Image.new("RGB", (size * k, size * k), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for d in scene.distractors:
        fill = (d.gray, d.gray, d.gray)
        if d.kind == "line":
            draw.line([v * k for v in d.xy], fill=fill, width=k)
        else:
            cx, cy, r = (v * k for v in d.xy)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    for obj in scene.objects:
        fill = COLORS[obj.color]
        x1, y1, x2, y2 = obj.box
        rect = [x1 * k, y1 * k, x2 * k - 1, y2 * k - 1]  # PIL boxes are inclusive
        if obj.shape == "circle":
            draw.ellipse(rect, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(rect, fill=fill)
        else:
            pts = _shape_polygon(obj.shape, (x1 * k, y1 * k, x2 * k - 1, y2 * k - 1))
            draw.polygon([(float(px), float(py)) for px, py in pts], fill=fill)
    return canvas.resize((size, size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------- tasks
def _article(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def caption_for(objects: Sequence[ShapeObject]) -> str:
    """Canonical caption: objects left to right, e.g. "a red circle, a blue square and an orange star."."""
    items = [_article(o.name) for o in objects]
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return text + "."


@dataclass
class _Ctx:
    """Per-split state shared by the task builders."""

    index: int
    pair_counts: Counter
    grounding_format: str
    pope_binding: float = 0.0


_QA = tuple[str, str, dict[str, Any]]  # question, answer, task-specific meta


def _task_caption(scene: Scene, rng: np.random.Generator, ctx: _Ctx) -> _QA:
    prompt = CAPTION_PROMPTS[int(rng.integers(0, len(CAPTION_PROMPTS)))]
    return prompt, caption_for(scene.objects), {}


def _task_attribute_qa(scene: Scene, rng: np.random.Generator, ctx: _Ctx) -> _QA | None:
    objs = scene.objects
    shape_counts = Counter(o.shape for o in objs)
    color_counts = Counter(o.color for o in objs)
    options: list[_QA] = []
    for o in objs:
        if shape_counts[o.shape] == 1:
            q = f"What color is the {o.shape}?"
            options.append((q, o.color, {"attribute": "color", "target": o.to_dict()}))
        if color_counts[o.color] == 1:
            q = f"What shape is the {o.color} object?"
            options.append((q, o.shape, {"attribute": "shape", "target": o.to_dict()}))
    if not options and len(objs) >= 2 and all(objs[0].box[2] <= o.box[0] for o in objs[1:]):
        # Every color and shape is repeated: fall back to a positional reference.
        q = "What color is the leftmost object?"
        options.append((q, objs[0].color, {"attribute": "color", "target": objs[0].to_dict()}))
    if not options:
        return None
    return options[int(rng.integers(0, len(options)))]


def _task_counting(scene: Scene, rng: np.random.Generator, ctx: _Ctx) -> _QA:
    kind = ("all", "color", "shape")[int(rng.integers(0, 3))]
    if kind == "all":
        return "How many objects are there?", str(len(scene.objects)), {"count_of": "all"}
    present = [getattr(o, kind) for o in scene.objects]
    vocab = list(COLORS) if kind == "color" else list(SHAPES)
    absent = [v for v in vocab if v not in present]
    pool = present if (rng.random() < 0.75 or not absent) else absent
    value = pool[int(rng.integers(0, len(pool)))]
    count = sum(1 for v in present if v == value)
    q = f"How many {value} objects are there?" if kind == "color" else f"How many {value}s are there?"
    return q, str(count), {"count_of": kind, "value": value}


_RELATIONS = {
    # relation -> phrase; "a REL b" holds when a's box lies entirely on that side of b's box.
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}


def _holds(rel: str, a: ShapeObject, b: ShapeObject) -> bool:
    if rel == "left":
        return a.box[2] <= b.box[0]
    if rel == "right":
        return a.box[0] >= b.box[2]
    if rel == "above":
        return a.box[3] <= b.box[1]
    return a.box[1] >= b.box[3]


def _task_spatial(scene: Scene, rng: np.random.Generator, ctx: _Ctx) -> _QA | None:
    objs = scene.objects
    size = scene.image_size
    if len(objs) == 1:
        o = objs[0]
        x1, y1, x2, y2 = o.box
        options = []
        if x2 <= size / 2 or x1 >= size / 2:
            options += [("left half", x2 <= size / 2), ("right half", x1 >= size / 2)]
        if y2 <= size / 2 or y1 >= size / 2:
            options += [("top half", y2 <= size / 2), ("bottom half", y1 >= size / 2)]
        if not options:  # the object straddles both midlines: no unambiguous question
            return None
        where, truth = options[int(rng.integers(0, len(options)))]
        q = f"Is the {o.name} in the {where} of the image?"
        return q, "yes" if truth else "no", {"relation": where, "subject": o.to_dict()}
    # Boxes never overlap, so every pair is separated along x or y: a decidable relation always exists.
    facts = [(r, a, b) for a in objs for b in objs if a is not b for r in _RELATIONS if _holds(r, a, b)]
    rel, a, b = facts[int(rng.integers(0, len(facts)))]
    if rng.random() < 0.25:
        # Name question: only when exactly one object stands in the relation to b.
        holders = [o for o in objs if o is not b and _holds(rel, o, b)]
        if len(holders) == 1:
            q = f"What is {_RELATIONS[rel]} the {b.name}?"
            meta = {"relation": rel, "subject": a.to_dict(), "reference": b.to_dict()}
            return q, f"the {a.name}", meta
    if rng.random() < 0.5:  # swap the pair: "is b REL a" is then false (the boxes are disjoint)
        a, b, truth = b, a, False
    else:
        truth = True
    q = f"Is the {a.name} {_RELATIONS[rel]} the {b.name}?"
    return q, "yes" if truth else "no", {"relation": rel, "subject": a.to_dict(), "reference": b.to_dict()}


def _task_pope(scene: Scene, rng: np.random.Generator, ctx: _Ctx) -> _QA:
    # Exact balance: even scene indices ask about a present object, odd ones about an absent one;
    # the POPE split cycles every two scenes so each split is balanced too.
    positive = ctx.index % 2 == 0
    pope_split = POPE_SPLITS[(ctx.index // 2) % len(POPE_SPLITS)]
    present = {(o.color, o.shape) for o in scene.objects}
    if positive:
        color, shape = sorted(present)[int(rng.integers(0, len(present)))]
    else:
        absent = [p for p in _PAIRS if p not in present]
        pool = absent
        if pope_split == "popular":
            ranked = sorted(absent, key=lambda p: (-ctx.pair_counts[p], _PAIRS.index(p)))
            pool = ranked[:3]
        elif pope_split == "adversarial":
            shares = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
            pool = shares or absent
        if ctx.pope_binding > 0 and rng.random() < ctx.pope_binding:
            # a binding negative: its colour and its shape are both in the scene, on different objects
            colors, shapes = {c for c, _ in present}, {s for _, s in present}
            pool = [p for p in absent if p[0] in colors and p[1] in shapes] or pool
        color, shape = pool[int(rng.integers(0, len(pool)))]
    q = f"Is there {_article(color + ' ' + shape)} in the image?"
    meta = {"pope_split": pope_split, "pope_object": {"color": color, "shape": shape}}
    return q, "yes" if positive else "no", meta


def _task_grounding(scene: Scene, rng: np.random.Generator, ctx: _Ctx) -> _QA:
    o = scene.objects[int(rng.integers(0, len(scene.objects)))]
    ref = f"the {o.name}"
    answer = format_box(
        Box(*map(float, o.box)), ctx.grounding_format, scene.image_size, scene.image_size, ref=ref
    )
    q = f"Give the bounding box of {ref}."
    return q, answer, {"target": o.to_dict(), "ref": ref, "grounding_format": ctx.grounding_format}


def _task_region(scene: Scene, rng: np.random.Generator, ctx: _Ctx) -> _QA:
    o = scene.objects[int(rng.integers(0, len(scene.objects)))]
    box = format_box(Box(*map(float, o.box)), ctx.grounding_format, scene.image_size, scene.image_size)
    q = f"What is in {box}?"
    return q, _article(o.name), {"target": o.to_dict(), "grounding_format": ctx.grounding_format}


# Tasks whose answer can be reasoned from the objects listed left to right (`describe_first`).
DESCRIBABLE_TASKS: tuple[str, ...] = ("counting", "pope", "spatial")


_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def described_answer(objects: Sequence[ShapeObject], answer: str, numbered: bool = False) -> str:
    """A short answer after the objects listed left to right, in one sentence: "I see a red circle and a
    blue square, so yes." or, `numbered` (for counts), "I see: first, a red circle; second, a blue square;
    so 2." The answer stays the reply's first number, and the POPE rule's first sentence holds "no" exactly
    when the answer is no."""
    if numbered and len(objects) <= len(_ORDINALS):
        items = "; ".join(f"{_ORDINALS[i]}, {_article(o.name)}" for i, o in enumerate(objects))
        return f"I see: {items}; so {answer}."
    return f"I see {caption_for(objects).rstrip('.')}, so {answer}."


_TASKS: dict[str, Callable[[Scene, np.random.Generator, _Ctx], _QA | None]] = {
    "caption": _task_caption,
    "attribute_qa": _task_attribute_qa,
    "counting": _task_counting,
    "spatial": _task_spatial,
    "pope": _task_pope,
    "grounding": _task_grounding,
    "region": _task_region,
}


def make_records(
    scene: Scene,
    image: str,
    scene_id: str,
    rng: np.random.Generator,
    tasks: Sequence[str] = ALL_TASKS,
    index: int = 0,
    pair_counts: Counter | None = None,
    grounding_format: str = "qwen",
    describe_first: Sequence[str] = (),
    pope_binding: float = 0.0,
) -> list[dict[str, Any]]:
    """LLaVA-format records (one per task, unless a task has no unambiguous question) for one scene.

    For tasks in `describe_first` a yes/no or number answer first lists the objects, then answers
    (`described_answer`); the record's `answer` stays the short gold answer that metrics compare with.
    `pope_binding`: the share of POPE negatives that are binding negatives where the scene has one (a colour
    and a shape both in the scene, on different objects)."""
    ctx = _Ctx(index, pair_counts if pair_counts is not None else Counter(), grounding_format, pope_binding)
    records = []
    base_meta = scene.to_meta()
    for task in tasks:
        qa = _TASKS[task](scene, rng, ctx)
        if qa is None:
            continue
        question, answer, extra = qa
        reply = answer
        # a number or yes/no only: spatial questions that ask for a name keep their answer
        if task in describe_first and (answer.isdigit() or answer in ("yes", "no")):
            reply = described_answer(scene.objects, answer, numbered=task == "counting")
        records.append(
            {
                "id": f"{scene_id}-{task}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": reply},
                ],
                "task": task,
                "answer": answer,
                "meta": {"scene_id": scene_id, **base_meta, **extra},
            }
        )
    return records


# ------------------------------------------------------------------------------------------- datasets
def split_seed(seed: int, split: str) -> np.random.SeedSequence:
    """Independent random stream per split, keyed by the split's name (not its position)."""
    return np.random.SeedSequence([seed, zlib.crc32(split.encode())])


def _ordered_splits(splits: dict[str, int]) -> list[str]:
    first = [s for s in _SPLIT_PRIORITY if s in splits]
    return first + [s for s in splits if s not in first]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def generate_shapesworld(
    out_dir: str | os.PathLike,
    n_scenes: int,
    seed: int,
    image_size: int = 64,
    tasks: Sequence[str] = ALL_TASKS,
    max_objects: int = 3,
    noise: bool = False,
    grounding_format: str = "qwen",
    splits: dict[str, int] | None = None,
    describe_first: Sequence[str] = (),
    train_pope_binding: float = 0.0,
) -> dict[str, Path]:
    """Write PNGs under `out_dir/images/` and one LLaVA JSON per split; returns {split: json path}.

    `splits` maps split names to scene counts (default: all `n_scenes` in "train"). The same
    arguments always give byte-identical files. No scene appears in two splits. `describe_first`: tasks
    whose answers first list the objects (see `make_records`). `train_pope_binding` (0..1): the share of the
    train split's POPE negatives drawn as binding negatives where the scene allows one ("a red square" when a
    red circle and a blue square are in the scene): hard negatives for training a model to bind colour and
    shape; val and test keep POPE's random / popular / adversarial negatives (byte-identical to 0).
    """
    unknown = [t for t in tasks if t not in _TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {list(_TASKS)}")
    if not tasks:
        raise ValueError("tasks must not be empty")
    if not 0.0 <= train_pope_binding <= 1.0:
        raise ValueError(f"train_pope_binding must be within 0..1, got {train_pope_binding}")
    odd = [t for t in describe_first if t not in DESCRIBABLE_TASKS]
    if odd:
        raise ValueError(
            f"describe_first: {odd} cannot be answered from the object list; choose from "
            f"{list(DESCRIBABLE_TASKS)}"
        )
    splits = dict(splits) if splits else {DEFAULT_SPLIT: n_scenes}
    if any(n < 0 for n in splits.values()):
        raise ValueError(f"split sizes must be >= 0: {splits}")
    format_box(Box(0.0, 0.0, 1.0, 1.0), grounding_format, image_size, image_size)  # fail fast on a bad fmt
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    seen: set[tuple] = set()
    paths: dict[str, Path] = {}
    counts: dict[str, int] = {}
    for split in _ordered_splits(splits):
        rng = np.random.default_rng(split_seed(seed, split))
        scenes: list[Scene] = []
        rejected = 0
        while len(scenes) < splits[split]:
            scene = make_scene(rng, image_size, max_objects, noise)
            if scene.signature() in seen:  # resample: keeps splits (and scenes within one) disjoint
                rejected += 1
                if rejected > 1000 + 10 * splits[split]:
                    raise RuntimeError(
                        f"ShapesWorld {split}: too many repeated scenes; ask for fewer scenes, "
                        "a larger image_size or more max_objects"
                    )
                continue
            seen.add(scene.signature())
            scenes.append(scene)
        pair_counts = Counter((o.color, o.shape) for s in scenes for o in s.objects)
        records: list[dict[str, Any]] = []
        for i, scene in enumerate(scenes):
            scene_id = f"{split}-{i:06d}"
            image = f"images/{scene_id}.png"
            render(scene).save(out / image, format="PNG")
            binding = train_pope_binding if split == DEFAULT_SPLIT else 0.0
            records += make_records(
                scene, image, scene_id, rng, tasks, i, pair_counts, grounding_format, describe_first, binding
            )
        path = out / f"{split}.json"
        _write_atomic(path, json.dumps(records, indent=1).encode())
        paths[split], counts[split] = path, len(records)
        logger.info("ShapesWorld %s: %d scenes, %d records -> %s", split, len(scenes), len(records), path)
    info = {
        "generator": "shapesworld",
        "seed": seed,
        "image_size": image_size,
        "tasks": list(tasks),
        "max_objects": max_objects,
        "noise": noise,
        "grounding_format": grounding_format,
        "describe_first": list(describe_first),
        "train_pope_binding": train_pope_binding,
        "splits": {s: {"scenes": splits[s], "records": counts[s], "file": paths[s].name} for s in splits},
        "colors": {k: list(v) for k, v in COLORS.items()},
        "shapes": list(SHAPES),
    }
    _write_atomic(out / "shapesworld_info.json", json.dumps(info, indent=1).encode())
    return {s: paths[s] for s in splits}


__all__ = [
    "ALL_TASKS",
    "COLORS",
    "POPE_SPLITS",
    "SHAPES",
    "DESCRIBABLE_TASKS",
    "Distractor",
    "Scene",
    "ShapeObject",
    "caption_for",
    "described_answer",
    "generate_shapesworld",
    "make_records",
    "make_scene",
    "render",
    "split_seed",
]
