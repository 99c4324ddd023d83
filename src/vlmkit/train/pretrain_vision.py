"""The small ViT's pretraining without the LLM — the `vision_pretrain` objective (contrastive InfoNCE against a
small text encoder and/or a per-patch detection head) — plus cheap linear probes of the result.

Over 400 lines: the objective needs its own data (image–text pairs with object boxes), text side (word
tokenizer, text encoder, caption forms and hard negatives), dense targets, files and probes, which nothing else
uses. Its steps run on the shared loop (train/objectives.py, train/loop.py): the schedule, progress bar,
checkpoints and exact resume are not here.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from vlmkit.config import VisionConfig, drop_unknown_keys, from_dict, save_yaml, to_dict
from vlmkit.data.formats import SampleError, parse_record, read_records
from vlmkit.data.images import ImageError, load_image, to_tensor
from vlmkit.faults import kill_point
from vlmkit.io import atomic_write_bytes, atomic_write_text
from vlmkit.log import get_logger
from vlmkit.models.detection import DetectionHead
from vlmkit.models.vision import VIT_WEIGHTS, SmallViT
from vlmkit.train.objectives import OBJECTIVES, Objective, ObjectiveConfig, cpu_threads, run_objective

log = get_logger(__name__)

TEXT_WEIGHTS = "text_encoder.safetensors"
META_FILE = "pretrain_vision.json"
VISION_CONFIG_FILE = "vision_config.json"
METRICS_FILE = "metrics.json"


# ------------------------------------------------------------------------------------------------ configs
@dataclass
class TextEncoderConfig:
    """Word-level transformer text encoder (sees word order; CLS pooling)."""

    dim: int = 64
    depth: int = 1
    heads: int = 2
    max_len: int = 40


@dataclass
class PretrainVisionConfig(ObjectiveConfig):
    """The `vision_pretrain` objective (`vlmkit pretrain-vision`, a recipe's `pretrain_vision:` section): a
    `SmallViT` trained without the LLM, on `steps` optimizer steps (and the other settings every objective has,
    `ObjectiveConfig`). Loss: `contrastive_weight` x symmetric InfoNCE against a small text encoder (learned
    temperature) + `dense_weight` x per-patch label heads.

    Records holding `meta.objects` (a `box` and one label per `label_groups` key each) get a per-patch
    detection head on the `select_layer` features (each group's label and the object's box for every patch;
    saved as `detection_head.safetensors` for the word bridges) and random left-right mirroring (`hflip`; texts
    and labels mirrored too; other records are never flipped). `label_groups` maps an object key to its label
    words (an empty list: every value found in the data, sorted); a value not in the list is background for
    that group. ShapesWorld-style objects ({color, shape, box}) also get positional/count caption variants
    (`text_forms`) and attribute-binding hard negatives (`hard_negatives` per image). With
    dense labels, `contrastive_tower: top` stops the contrastive gradient at the `select_layer` features:
    it trains only the blocks above them (none when `select_layer` is -1) and the text side, because when
    it reaches them the patch features learn shape far more slowly (measured: linear-probe shape accuracy
    0.41 vs 0.94 after 600 steps); `all` lets it train the whole tower. `contrastive_weight: 0` trains the
    dense heads alone, at about half the step time. Without dense labels the contrastive loss trains the
    whole tower either way.
    """

    vision: VisionConfig = field(default_factory=lambda: VisionConfig.make("vit"))
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 64
    batch_size: int = 64
    contrastive_weight: float = 1.0
    contrastive_tower: str = "top"
    hard_negatives: int = 2
    text_forms: bool = True
    label_groups: dict[str, list[str]] = field(default_factory=lambda: {"color": [], "shape": []})
    hflip: bool = True
    dense_weight: float = 1.0
    max_pairs: int = 0


# -------------------------------------------------------------------------------------------------- data
@dataclass
class PairData:
    """Image–text pairs in memory; `objects[i]` is the scene's object list (boxes in tower pixels) or None."""

    pixels: torch.Tensor  # [N, 3, S, S], normalized for the tower
    captions: list[str]
    objects: list[list[dict[str, Any]] | None]
    images: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _caption_of(record: dict[str, Any], index: int) -> tuple[str, str] | None:
    """(image ref, caption) of a caption pair, a `task: caption` record, or a one-image conversation."""

    if isinstance(record.get("caption"), str) and isinstance(record.get("image"), str):
        return record["image"], record["caption"]
    if "task" in record and record["task"] != "caption":
        return None
    try:
        sample = parse_record(record, index=index, caption_instructions=())
    except SampleError:
        return None
    replies = [m.text.strip() for m in sample.messages if m.role == "assistant" and m.text.strip()]
    if len(sample.images) != 1 or not replies:
        return None
    return sample.images[0], replies[0]


def _scaled_objects(
    record: dict[str, Any], image_size: int, keys: Sequence[str] = ("color", "shape")
) -> list[dict[str, Any]] | None:
    """`meta.objects` (a box and the label `keys` each) with boxes rescaled to the tower's square image (None
    when absent or malformed)."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    objects = meta.get("objects", record.get("objects"))
    if not isinstance(objects, list) or not objects:
        return None
    width, height = meta.get("width", image_size), meta.get("height", image_size)
    out = []
    for o in objects:
        if not (isinstance(o, dict) and {*keys, "box"} <= o.keys() and len(o["box"]) == 4):
            return None
        x1, y1, x2, y2 = (float(v) for v in o["box"])
        sx, sy = image_size / float(width), image_size / float(height)
        out.append({**{k: str(o[k]) for k in keys}, "box": (x1 * sx, y1 * sy, x2 * sx, y2 * sy)})
    return out


def load_pairs(
    path: str | Path,
    vision: VisionConfig,
    image_root: str | Path | None = None,
    max_pairs: int = 0,
    label_keys: Sequence[str] = ("color", "shape"),
) -> PairData:
    """Caption JSONL / LLaVA JSON (ShapesWorld: its `caption` records) -> tensors, one pair per image; objects
    (`meta.objects` with a box and every one of `label_keys`) kept per image."""

    root = Path(image_root) if image_root is not None else Path(path).parent
    size = vision.image_size
    seen: set[str] = set()
    pixels: list[torch.Tensor] = []
    data = PairData(torch.empty(0), [], [], [])
    bad = 0
    for index, record in read_records(path):
        if isinstance(record, Exception):
            continue
        pair = _caption_of(record, index)
        if pair is None or pair[0] in seen:
            continue
        ref, caption = pair
        seen.add(ref)
        file = Path(ref) if Path(ref).is_absolute() else root / ref
        try:
            image = load_image(file)
        except ImageError as err:
            bad += 1
            log.debug("skipping %s: %s", file, err)
            continue
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)  # as SmallViT.transform
        pixels.append(to_tensor(image, vision.image_mean, vision.image_std))  # [3, S, S]
        data.captions.append(caption)
        data.objects.append(_scaled_objects(record, size, label_keys))
        data.images.append(ref)
        if max_pairs and len(pixels) >= max_pairs:
            break
    if bad:
        log.warning("%s: skipped %d unreadable images", path, bad)
    if not pixels:
        raise ValueError(f"{path}: no image–caption pairs (caption JSONL, LLaVA JSON or task=caption)")
    data.pixels = torch.stack(pixels)  # [N, 3, S, S]
    return data


# --------------------------------------------------------------------------------------------- tokenizer
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Word-level vocabulary built from the training texts; id 0 pads, 1 is unknown, 2 is the CLS token."""

    PAD, UNK, CLS = 0, 1, 2
    SPECIALS = ("<pad>", "<unk>", "<cls>")

    def __init__(self, vocab: Sequence[str]) -> None:
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts: Sequence[str], max_size: int = 30000) -> WordTokenizer:
        counts = Counter(w for t in texts for w in words(t))
        kept = sorted(counts, key=lambda w: (-counts[w], w))[: max_size - len(cls.SPECIALS)]
        return cls([*cls.SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """Texts -> ids [B, L] (CLS first, right-padded, truncated to `max_len`)."""
        rows = [[self.CLS, *(self.index.get(w, self.UNK) for w in words(t))][:max_len] for t in texts]
        ids = torch.full((len(rows), max(len(r) for r in rows)), self.PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids


# ------------------------------------------------------------------------------------------------ models
class TextEncoder(nn.Module):
    """Word embeddings + learned positions -> pre-norm transformer -> CLS state -> projection."""

    def __init__(self, vocab_size: int, cfg: TextEncoderConfig, out_dim: int) -> None:
        super().__init__()
        self.max_len = cfg.max_len
        self.embed = nn.Embedding(vocab_size, cfg.dim, padding_idx=WordTokenizer.PAD)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_len, cfg.dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.dim,
                cfg.heads,
                4 * cfg.dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, out_dim, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)  # words and positions on one scale (GPT-2 style)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> embeddings [B, E] (not normalized)."""
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]  # [B, L, Dt]
        pad = ids == WordTokenizer.PAD  # [B, L]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        return self.proj(self.norm(x[:, 0]))  # [B, E]


class ContrastiveModel(nn.Module):
    """The tower, a text encoder and the heads trained with it; only `tower` is kept for the VLM."""

    def __init__(
        self,
        vision: VisionConfig,
        tokenizer: WordTokenizer,
        text: TextEncoderConfig,
        embed_dim: int,
        groups: dict[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        self.tower = SmallViT(vision)
        self.tokenizer = tokenizer
        self.text_cfg = text
        self.groups = {k: list(v) for k, v in (groups or {}).items() if v}
        dim = self.tower.feature_dim
        self.image_proj = nn.Linear(dim, embed_dim, bias=False)
        self.text = TextEncoder(len(tokenizer), text, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # per patch: background + each group's labels, and the box (x1, y1, x2, y2) / image size
        self.detector = DetectionHead(dim, self.groups) if self.groups else None

    @property
    def colors(self) -> list[str]:
        return self.groups.get("color", [])

    @property
    def shapes(self) -> list[str]:
        return self.groups.get("shape", [])

    def encode_images(self, pixels: torch.Tensor, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B, 3, S, S] -> (unit embeddings [B, E], patch features at `select_layer` [B, G*G, D]).

        Same computation as `SmallViT.hidden_states`; with `detach`, the embedding's gradient stops at the
        `select_layer` features (it trains only the blocks above them, if any, and the projection).
        """
        t = self.tower
        x = t.patch_embed(pixels).flatten(2).transpose(1, 2)  # [B, G*G, D]
        if t.cls is not None:
            x = torch.cat([t.cls.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1+G*G, D]
        x = x + t.pos
        depth = len(t.blocks)
        select = t.select_layer % (depth + 1)  # index into [embeddings, block_1, ..., block_L]
        patches = x
        x = x.detach() if detach and select == 0 else x
        for k, block in enumerate(t.blocks, start=1):
            x = block(x)
            if k == depth:
                x = t.norm(x)
            if k == select:
                patches = x
                x = x.detach() if detach else x
        pooled = x[:, 0] if t.cls is not None else x.mean(dim=1)  # [B, D]
        return F.normalize(self.image_proj(pooled), dim=-1), patches[:, t.num_prefix :]

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> unit embeddings [T, E]."""
        device = self.logit_scale.device
        ids = self.tokenizer.encode(texts, self.text_cfg.max_len).to(device)  # [T, L]
        return F.normalize(self.text(ids), dim=-1)

    def dense_logits(self, patches: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """patches [B, N, D] -> per label group logits [B, N, 1 + n_g], boxes [B, N, 4] (0..1)."""
        if self.detector is None:
            raise ValueError("this model has no detection head (its data had no meta.objects)")
        logits, box = self.detector.logits(patches)
        return logits, box.sigmoid()


# --------------------------------------------------------------------------------- texts and hard negatives
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
FORMS = ("caption", "position", "shuffled", "count")
_WHERE = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


def _article(phrase: str) -> str:
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def _where(box: Sequence[float], size: int) -> str:
    """'top left', 'bottom', 'center', ... from the box center on a 3x3 grid of the image."""
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return " ".join(p for p in (row, col) if p) or "center"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class _Item:
    color: str
    shape: str
    where: str


def render_text(items: Sequence[_Item], form: str) -> str:
    """One description of a scene; `items` in left-to-right order except for the `shuffled` form."""
    if form == "caption":
        return _join([_article(f"{o.color} {o.shape}") for o in items]) + "."
    body = _join([f"{_article(f'{o.color} {o.shape}')} at the {o.where}" for o in items]) + "."
    if form == "count":
        n = len(items)
        count = _NUMBERS[n] if n < len(_NUMBERS) else str(n)
        return f"{count} object{'s' if n != 1 else ''}: " + render_text(items, "caption")
    return body  # position / shuffled (the caller orders the items)


def _perturb(
    items: list[_Item], rng: random.Random, colors: Sequence[str], shapes: Sequence[str]
) -> list[_Item]:
    """A scene description that differs from `items` in attribute binding, position, an attribute or count."""
    n = len(items)
    kinds = (
        ["color", "shape"] + (["swap_color", "swap_shape", "swap_where", "drop"] if n > 1 else []) + ["add"]
    )
    kind = rng.choice(kinds)
    out = list(items)
    if kind in ("swap_color", "swap_shape", "swap_where"):
        i, j = rng.sample(range(n), 2)
        attr = kind.split("_")[1]
        a, b = getattr(out[i], attr), getattr(out[j], attr)
        out[i], out[j] = replace(out[i], **{attr: b}), replace(out[j], **{attr: a})
        if attr == "where":  # in order-based forms the position is the order: swap the items too
            out[i], out[j] = out[j], out[i]
    elif kind in ("color", "shape"):
        i = rng.randrange(n)
        pool = [v for v in (colors if kind == "color" else shapes) if v != getattr(out[i], kind)]
        if pool:
            out[i] = replace(out[i], **{kind: rng.choice(pool)})
    elif kind == "drop":
        out.pop(rng.randrange(n))
    else:
        color = rng.choice(list(colors) or [items[0].color])
        shape = rng.choice(list(shapes) or [items[0].shape])
        out.insert(rng.randrange(n + 1), _Item(color, shape, rng.choice(_WHERE)))
    return out


def _swap_words(text: str, rng: random.Random) -> str:
    """Generic word-order negative for captions without object metadata: swap two different content words."""
    tokens = text.split()
    idx = [i for i, t in enumerate(tokens) if len(t.strip(".,;:!?")) > 2]
    for _ in range(8):
        if len(idx) < 2:
            break
        i, j = rng.sample(idx, 2)
        if tokens[i].lower() != tokens[j].lower():
            tokens[i], tokens[j] = tokens[j], tokens[i]
            return " ".join(tokens)
    return text + " " + rng.choice(["not", "no", "none"])


def mirror(objects: Sequence[dict[str, Any]], image_size: int) -> list[dict[str, Any]]:
    """Objects of the left-right mirrored image."""
    return [
        {**o, "box": (image_size - o["box"][2], o["box"][1], image_size - o["box"][0], o["box"][3])}
        for o in objects
    ]


def _items(objects: Sequence[dict[str, Any]] | None, image_size: int) -> list[_Item] | None:
    """Objects left to right (then top to bottom) as described items (None unless each has color and shape)."""
    if not objects or not all("color" in o and "shape" in o for o in objects):
        return None
    ordered = sorted(
        objects, key=lambda o: ((o["box"][0] + o["box"][2]) / 2, (o["box"][1] + o["box"][3]) / 2)
    )
    return [_Item(o["color"], o["shape"], _where(o["box"], image_size)) for o in ordered]


class TextSampler:
    """Positive texts and hard negatives per image, from `meta.objects` when present."""

    def __init__(
        self, data: PairData, image_size: int, forms: bool, colors: Sequence[str], shapes: Sequence[str]
    ):
        self.data, self.forms = data, forms
        self.colors, self.shapes = list(colors), list(shapes)
        self.items: list[list[_Item] | None] = [_items(o, image_size) for o in data.objects]
        self.mirrored: list[list[_Item] | None] = [
            _items(mirror(o, image_size), image_size) if o else None for o in data.objects
        ]

    def vocabulary_texts(self) -> list[str]:
        """Texts covering every word the sampler can produce (for the tokenizer)."""
        extra = [f"{n} objects: object at the top left top right bottom center" for n in _NUMBERS]
        extra += [" ".join(self.colors), " ".join(self.shapes)]
        return list(self.data.captions) + extra

    def sample(
        self, i: int, num_negatives: int, rng: random.Random, form: str | None = None, flipped: bool = False
    ) -> tuple[str, list[str]]:
        """(positive text, `num_negatives` negative texts) for image i (mirrored left-right if `flipped`)."""
        items = self.mirrored[i] if flipped else self.items[i]
        if items is None:
            caption = self.data.captions[i]
            return caption, [_swap_words(caption, rng) for _ in range(num_negatives)]
        form = form or (rng.choice(FORMS) if self.forms else "caption")
        items = list(items)
        if form == "shuffled":
            rng.shuffle(items)
        positive = render_text(items, form)
        negatives: list[str] = []
        for _ in range(num_negatives * 4):
            if len(negatives) == num_negatives:
                break
            text = render_text(_perturb(items, rng, self.colors, self.shapes), form)
            if text != positive and text not in negatives:
                negatives.append(text)
        return positive, negatives


# ------------------------------------------------------------------------------------------- dense targets
def dense_targets(
    objects: Sequence[dict[str, Any]] | None,
    image_size: int,
    grid: int,
    groups: dict[str, Sequence[str]],
    min_overlap: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch targets (row-major G*G): label ids [len(groups), N] (0 = background; a value not among a
    group's words is background too), box [N, 4] in 0..1, and whether the patch belongs to an object [N].

    A patch belongs to the object whose box covers most of it, if that covers at least `min_overlap`.
    """
    n = grid * grid
    labels, box = torch.zeros(len(groups), n, dtype=torch.long), torch.zeros(n, 4)
    on = torch.zeros(n, dtype=torch.bool)
    if not objects:
        return labels, box, on
    cell = image_size / grid
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    x1, y1 = cols.flatten() * cell, rows.flatten() * cell  # [N] patch corners
    boxes = torch.tensor([list(o["box"]) for o in objects], dtype=torch.float32)  # [M, 4]
    w = (torch.minimum(x1[:, None] + cell, boxes[:, 2]) - torch.maximum(x1[:, None], boxes[:, 0])).clamp(
        min=0
    )
    h = (torch.minimum(y1[:, None] + cell, boxes[:, 3]) - torch.maximum(y1[:, None], boxes[:, 1])).clamp(
        min=0
    )
    overlap, owner = (w * h / (cell * cell)).max(dim=1)  # [N], [N]
    on = overlap >= min_overlap
    for g, (key, words) in enumerate(groups.items()):
        ids = torch.tensor([list(words).index(o[key]) + 1 if o.get(key) in words else 0 for o in objects])
        labels[g, on] = ids[owner[on]]
    box[on] = boxes[owner[on]] / image_size
    return labels, box, on


# -------------------------------------------------------------------------------------------------- losses
def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_ids: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE with duplicates as shared positives; returns (loss, image->text top-1 accuracy).

    image_emb [B, E]; text_emb [T, E] whose first B rows are the positives of the B images and the rest extra
    (hard) negatives; text_ids [T] identifies equal texts (equal texts are all positives of an image).
    """
    b = image_emb.shape[0]
    logits = scale * image_emb @ text_emb.T  # [B, T]
    match = (text_ids[:b, None] == text_ids[None, :]).float()  # [B, T]
    i2t = -(F.log_softmax(logits, dim=1) * match / match.sum(1, keepdim=True)).sum(1).mean()
    square = match[:, :b]  # [B, B], symmetric
    t2i = -(F.log_softmax(logits[:, :b].T, dim=1) * square / square.sum(1, keepdim=True)).sum(1).mean()
    acc = match.gather(1, logits.argmax(1, keepdim=True)).mean()
    return (i2t + t2i) / 2, acc


def dense_loss(
    model: ContrastiveModel,
    patches: torch.Tensor,
    labels: torch.Tensor,
    box: torch.Tensor,
    on: torch.Tensor,
) -> torch.Tensor:
    """The detection objective (no LLM involved): per-patch cross-entropy of every label group + L1 box
    regression on object patches. patches [B, N, D], labels [B, G, N], box [B, N, 4], on [B, N]."""
    logits, box_pred = model.dense_logits(patches)
    loss = sum(F.cross_entropy(lg.flatten(0, 1), labels[:, g].flatten()) for g, lg in enumerate(logits))
    on = on.unsqueeze(-1).float()  # [B, N, 1]
    return loss + 5.0 * ((box_pred - box).abs() * on).sum() / (4 * on.sum()).clamp(min=1)


# ------------------------------------------------------------------------------------------------ training
def label_groups(data: PairData, groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """The detection head's label words per group: as configured, or (an empty list) every value in the data."""
    objs = [o for scene in data.objects if scene for o in scene]
    return {k: list(v) or sorted({o[k] for o in objs if k in o}) for k, v in groups.items()}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.endswith(("pos", "cls")) or "embed.weight" in name and "patch" not in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(cfg: PretrainVisionConfig, data: PairData) -> tuple[ContrastiveModel, TextSampler]:
    """A new model (tower from `cfg.vision`, loading `cfg.vision.path` if set) and its text sampler."""
    groups = label_groups(data, cfg.label_groups)
    colors, shapes = groups.get("color", []), groups.get("shape", [])
    sampler = TextSampler(data, cfg.vision.image_size, cfg.text_forms, colors, shapes)
    tokenizer = WordTokenizer.build(sampler.vocabulary_texts())
    model = ContrastiveModel(cfg.vision, tokenizer, cfg.text, cfg.embed_dim, groups)
    return model, sampler


def _batch_contrastive(
    model: ContrastiveModel,
    sampler: TextSampler,
    indices: list[int],
    flipped: list[bool],
    image_emb: torch.Tensor,
    hard_negatives: int,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of a batch: one sampled positive text per image plus `hard_negatives` perturbed texts each."""
    positives, negatives = [], []
    for i, f in zip(indices, flipped):
        p, n = sampler.sample(i, hard_negatives, rng, flipped=f)
        positives.append(p)
        negatives += n
    texts = positives + negatives
    ids = {t: k for k, t in enumerate(dict.fromkeys(texts))}
    text_ids = torch.tensor([ids[t] for t in texts])  # [T]
    return contrastive_loss(image_emb, model.encode_texts(texts), text_ids, model.logit_scale.exp())


def _check(cfg: PretrainVisionConfig) -> None:
    if cfg.vision.kind != "vit":
        raise ValueError(
            f"pretrain-vision trains the project's own ViT (vision.kind 'vit'), not '{cfg.vision.kind}'"
        )
    if cfg.contrastive_tower not in ("all", "top"):
        raise ValueError(f"contrastive_tower must be 'all' or 'top', not '{cfg.contrastive_tower}'")
    if cfg.steps <= 0:
        raise ValueError("set steps (> 0) to bound the pretraining (max_seconds may bound it further)")


@OBJECTIVES.register("vision_pretrain", config=PretrainVisionConfig)
class VisionPretrain(Objective):
    """The tower's pretraining as an objective: InfoNCE against the text encoder and/or the dense detection
    heads, over `ContrastiveModel` (tower, text encoder, heads); no LLM involved. `model`/`sampler`: an
    already built pair (`build_model`), else built here from `cfg` after seeding with `cfg.seed`."""

    def __init__(
        self,
        cfg: PretrainVisionConfig,
        data: PairData | None = None,
        built: tuple[ContrastiveModel, TextSampler] | None = None,
    ) -> None:
        _check(cfg)
        if data is None:
            if not cfg.data:
                raise ValueError("no data: set `data` (caption JSONL or LLaVA JSON)")
            t0 = time.perf_counter()
            data = load_pairs(cfg.data, cfg.vision, cfg.image_root, cfg.max_pairs, list(cfg.label_groups))
            log.info(
                "loaded %d image–text pairs from %s in %.1fs", len(data), cfg.data, time.perf_counter() - t0
            )
        if built is None:
            torch.manual_seed(cfg.seed)
            built = build_model(cfg, data)
            log.info(
                "pretraining ViT (dim %d, depth %d, %d params) + text encoder (%d words) on %d pairs "
                "(%d with objects)",
                built[0].tower.feature_dim, len(built[0].tower.blocks),
                sum(p.numel() for p in built[0].tower.parameters()),
                len(built[0].tokenizer), len(data), sum(o is not None for o in data.objects),
            )  # fmt: skip
        self.cfg, self.data = cfg, data
        self.model, self.sampler = built
        model, size = self.model, cfg.vision.image_size
        grid = model.tower.grid_size()
        self.has_objects = torch.tensor([o is not None for o in data.objects])  # [N]
        views = [data.objects, [mirror(o, size) if o else None for o in data.objects]]  # as is, mirrored
        targets = [[dense_targets(o, size, grid, model.groups) for o in objs] for objs in views]
        self.labels = torch.stack([torch.stack([t[0] for t in ts]) for ts in targets])  # [2, N, groups, G*G]
        self.box = torch.stack([torch.stack([t[1] for t in ts]) for ts in targets])  # [2, N, G*G, 4]
        self.on = torch.stack([torch.stack([t[2] for t in ts]) for ts in targets])  # [2, N, G*G]
        self.use_dense = cfg.dense_weight > 0 and bool(self.has_objects.any()) and model.detector is not None
        tower_params = list(model.tower.parameters())
        others = [p for p in model.parameters() if all(p is not q for q in tower_params)]
        self.clip_parts = [tower_params, others]
        self.rng = random.Random(cfg.seed)  # texts: positives' forms, hard negatives
        self.gen = torch.Generator().manual_seed(cfg.seed)  # data order, flips
        self.batch = min(cfg.batch_size, len(data))
        self.order, self.pos = torch.randperm(len(data), generator=self.gen), 0
        self.steps, self.ema = 0, [0.0, 0.0, 0.0]  # running loss, in-batch accuracy, dense loss
        contrastive = ["loss {task.fields[loss]:.3f}", "acc {task.fields[acc]:.2f}"]
        self.fields = (*(contrastive if cfg.contrastive_weight > 0 else []), "dense {task.fields[dense]:.3f}")

    def optimizer(self) -> torch.optim.Optimizer:
        groups = _param_groups(self.model, self.cfg.weight_decay)
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, 0.98))

    def _next_indices(self) -> torch.Tensor:
        if self.pos + self.batch > len(self.data):
            self.order, self.pos = torch.randperm(len(self.data), generator=self.gen), 0
        idx = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx

    def step(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        idx = self._next_indices()
        flip = torch.zeros(len(idx), dtype=torch.bool)
        if cfg.hflip:
            flip = (torch.rand(len(idx), generator=self.gen) < 0.5) & self.has_objects[idx]
        pixels = self.data.pixels[idx]  # [B, 3, S, S]
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        detach = self.use_dense and cfg.contrastive_tower == "top"
        image_emb, patches = model.encode_images(pixels, detach)  # [B, E], [B, G*G, D]
        loss, acc = torch.zeros(()), torch.zeros(())
        if cfg.contrastive_weight > 0:
            loss, acc = _batch_contrastive(
                model, self.sampler, idx.tolist(), flip.tolist(), image_emb, cfg.hard_negatives, self.rng
            )
        total = cfg.contrastive_weight * loss
        d_loss = torch.zeros(())
        if self.use_dense:
            keep, view = self.has_objects[idx], flip.long()
            d_loss = dense_loss(
                model,
                patches[keep],
                self.labels[view, idx][keep],
                self.box[view, idx][keep],
                self.on[view, idx][keep],
            )
            total = total + cfg.dense_weight * d_loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        for part in self.clip_parts:  # clipped apart: text-side gradients do not shrink the tower's updates
            torch.nn.utils.clip_grad_norm_(part, 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        self.steps += 1
        w = 0.9 if self.steps > 10 else 0.0
        self.ema = [w * e + (1 - w) * v.item() for e, v in zip(self.ema, (loss, acc, d_loss))]
        return dict(zip(("loss", "acc", "dense"), self.ema))

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.getstate(),
            "gen": self.gen.get_state(),
            "order": self.order,
            "pos": self.pos,
            "steps": self.steps,
            "ema": list(self.ema),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.gen.set_state(state["gen"])
        self.order, self.pos, self.steps, self.ema = (
            state["order"],
            state["pos"],
            state["steps"],
            state["ema"],
        )

    def describe(self, step: int, seconds: float) -> str:
        loss, acc, dense = self.ema
        if self.cfg.contrastive_weight > 0:
            temp = self.model.logit_scale.exp().item()
            return (
                f"step {step} ({seconds:.0f}s): loss {loss:.3f}, in-batch acc {acc:.3f}, dense {dense:.3f}, "
                f"temp {temp:.1f}"
            )
        return f"step {step} ({seconds:.0f}s): dense loss {dense:.3f}"  # no contrastive numbers to show

    def metrics(self, steps: int, seconds: float) -> dict[str, Any]:
        loss, acc, dense = self.ema
        return {
            "steps": steps,
            "seconds": round(seconds, 1),
            "images_per_second": round(steps * self.batch / max(seconds, 1e-9), 1),
            "loss": round(loss, 4),
            "train_retrieval_acc": round(acc, 4),
            "dense_loss": round(dense, 4),
            "logit_scale": round(self.model.logit_scale.exp().item(), 2),
            "pairs": len(self.data),
        }

    def save(self, out: Path, metrics: dict[str, Any]) -> None:
        save_pretrained(self.model, out, metrics)


def train_contrastive(
    cfg: PretrainVisionConfig,
    model: ContrastiveModel,
    sampler: TextSampler,
    data: PairData,
    progress: bool = False,
) -> dict[str, float]:
    """Train `model` in place on the shared loop, in memory (no checkpoints, nothing saved); returns training
    metrics. The model is left in eval mode."""
    with cpu_threads(cfg.threads):
        return run_objective(VisionPretrain(cfg, data, (model, sampler)), None, progress=progress)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write_bytes(path, save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def save_pretrained(
    model: ContrastiveModel, out_dir: str | Path, metrics: dict[str, Any] | None = None
) -> Path:
    """Write vision.safetensors (the tower), text_encoder.safetensors (the rest), vision_config.json/.yaml,
    pretrain_vision.json (vocabulary, text config, label groups), metrics.json and, when the model has one,
    the detection head alone (detection_head.safetensors / .json, what `bridge.detector.path` loads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(model.tower.state_dict(), out / VIT_WEIGHTS)
    kill_point("pretrain_save")
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("tower.")}
    _save_safetensors(rest, out / TEXT_WEIGHTS)
    vision = replace(model.tower.cfg, path=str(out.resolve()))
    atomic_write_text(out / VISION_CONFIG_FILE, json.dumps(to_dict(vision), indent=1))
    save_yaml(vision, out / "vision_config.yaml")
    meta = {
        "vocab": model.tokenizer.vocab,
        "text": to_dict(model.text_cfg),
        "embed_dim": model.image_proj.out_features,
        "label_groups": model.groups,
    }
    atomic_write_text(out / META_FILE, json.dumps(meta))
    if model.detector is not None:
        model.detector.save(out)
    if metrics is not None:
        atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=1))
    return out


def load_vision_config(out_dir: str | Path) -> VisionConfig:
    """The `VisionConfig` saved by `pretrain_vision`, with `path` pointing at `out_dir` (for a recipe)."""
    data = json.loads((Path(out_dir) / VISION_CONFIG_FILE).read_text())
    data = drop_unknown_keys(VisionConfig, data)  # written before each tower kind had its own config
    return replace(from_dict(VisionConfig, data), path=str(Path(out_dir).resolve()))


def load_pretrained(out_dir: str | Path) -> ContrastiveModel:
    """The whole contrastive model (tower, text encoder, heads) saved by `pretrain_vision`, in eval mode."""
    out = Path(out_dir)
    meta = json.loads((out / META_FILE).read_text())
    model = ContrastiveModel(
        load_vision_config(out),
        WordTokenizer(meta["vocab"]),
        from_dict(TextEncoderConfig, meta["text"]),
        int(meta["embed_dim"]),
        meta.get("label_groups") or {"color": meta.get("colors", []), "shape": meta.get("shapes", [])},
    )
    state = load_file(str(out / TEXT_WEIGHTS))
    # directories written before the head had a module of its own hold it as `dense.*`
    state = {("detector." + k if k.startswith("dense.") else k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("tower.") for k in missing):
        raise RuntimeError(
            f"{out / TEXT_WEIGHTS} does not match: missing={missing[:4]} unexpected={unexpected[:4]}"
        )
    return model.eval()


def pretrain_vision(
    cfg: PretrainVisionConfig,
    out_dir: str | Path,
    *,
    data: PairData | None = None,
    progress: bool = True,
    resume: bool = False,
) -> Path:
    """Pretrain a SmallViT on `cfg.data` (or preloaded `data`) into `out_dir`; returns `out_dir`.

    Checkpoints go to `out_dir/checkpoints/` every `cfg.save_every` steps; `resume` continues from the newest
    (the result equals an uninterrupted run's). `out_dir/vision.safetensors` loads with
    `VisionConfig(kind="vit", path=out_dir, ...)` using the dims saved in `out_dir/vision_config.json` (see
    `load_vision_config`); `out_dir/pretrain_config.yaml`, written last, marks the pretraining finished.
    """
    out = Path(out_dir)
    with cpu_threads(cfg.threads):
        metrics = run_objective(
            VisionPretrain(cfg, data), out, resume=resume, progress=progress, name="pretrain-vision"
        )
    log.info("saved pretrained ViT to %s (%s)", out, ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return out


# --------------------------------------------------------------------------------------------------- probe
@torch.no_grad()
def _patch_features(tower: SmallViT, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Frozen `select_layer` patch features [N, G*G, D] (prefix tokens dropped)."""
    tower.eval()
    grid = tower.grid_size()
    feats = [tower(pixels[i : i + batch])[:, -grid * grid :] for i in range(0, len(pixels), batch)]
    return torch.cat(feats)


def _fit_linear(
    x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, out_dim: int, l2: float = 1e-3
) -> nn.Linear:
    """Full-batch L-BFGS fit of a linear map on standardized features."""
    torch.manual_seed(0)
    head = nn.Linear(x.shape[1], out_dim)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=150, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head


def _standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp(min=1e-4)
    return [(t - mean) / std for t in (train, *others)]


def _object_rows(
    feats: torch.Tensor, data: PairData, grid: int, size: int
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Feature of the patch under each object's box center [M, D], and the objects."""
    rows, objs = [], []
    for i, scene in enumerate(data.objects):
        for o in scene or []:
            x1, y1, x2, y2 = o["box"]
            r = min(grid - 1, int((y1 + y2) / 2 / size * grid))
            c = min(grid - 1, int((x1 + x2) / 2 / size * grid))
            rows.append(feats[i, r * grid + c])
            objs.append(o)
    return torch.stack(rows), objs


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two [M, 4] xyxy box tensors."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1) + (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    return inter / (area - inter).clamp(min=1e-8)


@torch.no_grad()
def _retrieval(
    model: ContrastiveModel, val: PairData, num_distractors: int = 7, seed: int = 0
) -> dict[str, float]:
    """Val caption retrieval: top-1 among all val captions; the true caption vs perturbed ones."""
    sampler = TextSampler(val, model.tower.image_size, False, model.colors, model.shapes)
    image_emb = torch.cat([model.encode_images(val.pixels[i : i + 256])[0] for i in range(0, len(val), 256)])
    rng = random.Random(seed)
    pos, hard, swap_total, swap_hits = [], [], 0, 0
    for i in range(len(val)):
        p, negs = sampler.sample(i, num_distractors, rng, form="caption")
        pos.append(p)
        scores = model.encode_texts([p, *negs]) @ image_emb[i]  # [1+K]
        hard.append(bool(scores[0] > scores[1:].max()) if negs else True)
        items = sampler.items[i]
        if items and len({o.color for o in items}) > 1:  # pure binding swap: exchange two objects' colors
            swapped = list(items)
            a, b = next(
                (a, b)
                for a in range(len(items))
                for b in range(a + 1, len(items))
                if items[a].color != items[b].color
            )
            swapped[a], swapped[b] = (
                replace(items[a], color=items[b].color),
                replace(items[b], color=items[a].color),
            )
            s = model.encode_texts([p, render_text(swapped, "caption")]) @ image_emb[i]
            swap_total, swap_hits = swap_total + 1, swap_hits + int(s[0] > s[1])
    text_emb = model.encode_texts(pos)  # [N, E]
    best = (image_emb @ text_emb.T).argmax(1)  # [N]
    top1 = sum(pos[int(j)] == pos[i] for i, j in enumerate(best)) / len(val)
    return {
        "retrieval_top1": top1,
        "retrieval_vs_distractors": sum(hard) / len(hard),
        "retrieval_color_swap": swap_hits / max(1, swap_total),
    }


def _object_probes(
    f_train: torch.Tensor, f_val: torch.Tensor, train: PairData, val: PairData, grid: int, size: int
) -> dict[str, float]:
    """Color / shape classification and box regression from the patch under each object's box center."""
    x_tr, o_tr = _object_rows(f_train, train, grid, size)
    x_va, o_va = _object_rows(f_val, val, grid, size)
    x_tr, x_va = _standardize(x_tr, x_va)
    out = {}
    for attr in ("color", "shape"):
        values = sorted({o[attr] for o in o_tr})
        y_tr = torch.tensor([values.index(o[attr]) for o in o_tr])
        y_va = torch.tensor([values.index(o[attr]) if o[attr] in values else -1 for o in o_va])
        head = _fit_linear(x_tr, y_tr, F.cross_entropy, len(values))
        out[f"{attr}_at_object"] = (head(x_va).argmax(1) == y_va).float().mean().item()
    b_tr = torch.tensor([o["box"] for o in o_tr]) / size  # [M, 4]
    b_va = torch.tensor([o["box"] for o in o_va]) / size
    head = _fit_linear(x_tr, b_tr, F.mse_loss, 4)
    out["box_iou50"] = (_box_iou(head(x_va), b_va) >= 0.5).float().mean().item()
    return out


def _count_probe(
    f_train: torch.Tensor, f_val: torch.Tensor, train: PairData, val: PairData, grid: int
) -> float:
    """Object count classified from 2x2-average-pooled patch features (the whole grid when G is odd)."""

    def pooled(f: torch.Tensor) -> torch.Tensor:  # [N, G*G, D] -> [N, (G/2)^2 * D]
        n, _, d = f.shape
        if grid % 2:
            return f.reshape(n, -1)
        return f.reshape(n, grid // 2, 2, grid // 2, 2, d).mean(dim=(2, 4)).reshape(n, -1)

    y_tr = torch.tensor([len(o or []) for o in train.objects])
    y_va = torch.tensor([len(o or []) for o in val.objects])
    x_tr, x_va = _standardize(pooled(f_train), pooled(f_val))
    head = _fit_linear(x_tr, y_tr, F.cross_entropy, int(max(y_tr.max(), y_va.max())) + 1, l2=1e-2)
    return (head(x_va).argmax(1) == y_va).float().mean().item()


def probe(
    model: ContrastiveModel | SmallViT | str | Path,
    train: str | Path | PairData,
    val: str | Path | PairData,
    *,
    image_root: str | Path | None = None,
    max_train: int = 2000,
    threads: int = 2,
) -> dict[str, float]:
    """Linear probes on frozen `select_layer` patch features, fit on `train` (at most `max_train` scenes) and
    scored on `val`; both need ShapesWorld-style `meta.objects`. A few seconds for 2000 + 200 scenes.

    color_at_object / shape_at_object: the object's color/shape from the patch under its box center;
    box_iou50: share of objects whose box, regressed from that patch, has IoU >= 0.5; count: the number of
    objects from 2x2-pooled patch features. For a ContrastiveModel (or a pretrain-vision directory), also
    caption retrieval on `val`: top-1 among all val captions (`retrieval_top1`), the true caption against 7
    perturbed ones (`retrieval_vs_distractors`), and against the caption with two objects' colors swapped
    (`retrieval_color_swap`; chance 0.5).
    """
    with cpu_threads(threads):
        contrastive = load_pretrained(model) if isinstance(model, str | Path) else model
        tower = contrastive.tower if isinstance(contrastive, ContrastiveModel) else contrastive
        train_d = (
            train if isinstance(train, PairData) else load_pairs(train, tower.cfg, image_root, max_train)
        )
        val_d = val if isinstance(val, PairData) else load_pairs(val, tower.cfg, image_root)
        if not all(train_d.objects) or not all(val_d.objects):
            raise ValueError("probe needs ShapesWorld-style records with meta.objects in both train and val")
        grid, size = tower.grid_size(), tower.image_size
        f_train = _patch_features(tower, train_d.pixels[:max_train])  # [N, G*G, D]
        f_val = _patch_features(tower, val_d.pixels)  # [V, G*G, D]
        train_d = replace(train_d, objects=train_d.objects[:max_train])
        out = _object_probes(f_train, f_val, train_d, val_d, grid, size)
        out["count"] = _count_probe(f_train, f_val, train_d, val_d, grid)
        if isinstance(contrastive, ContrastiveModel):
            out.update(_retrieval(contrastive.eval(), val_d))
    return {k: round(v, 4) for k, v in out.items()}


__all__ = [
    "ContrastiveModel",
    "PairData",
    "PretrainVisionConfig",
    "TextEncoder",
    "TextEncoderConfig",
    "TextSampler",
    "WordTokenizer",
    "build_model",
    "mirror",
    "contrastive_loss",
    "dense_targets",
    "load_pairs",
    "load_pretrained",
    "load_vision_config",
    "pretrain_vision",
    "probe",
    "render_text",
    "save_pretrained",
    "train_contrastive",
    "VisionPretrain",
]
