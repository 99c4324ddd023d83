"""Word bridges: every visual token is a mixture of word embeddings, so it enters the LLM where its words live.

`vocab_mixture` (Ovis, arXiv 2405.20797): per position, probabilities over a visual vocabulary, embedded by a
table whose rows can start from the LLM's own embeddings of given words. With a detection head (`bridge.detector`)
the vocabulary is the head's label words: one token per label group per position.

`object_slots` (region tokens from a detector, as Groma, arXiv 2404.13013; boxes as a few discrete tokens, as
Pix2Seq, arXiv 2109.10852): the head's objects become `slots.num` slots in reading order, each one token per label
group (the objectness-weighted mixture of the group's word embeddings) followed by its box as digit tokens.
This is close to a detector writing soft text: what it can say is what the head was trained to detect.

Both keep visual tokens at the scale and in the form of word embeddings (one word per position), which the LLM
reads like text; see docs/quickstart.md for the measurements behind them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmkit.config import BridgeConfig
from vlmkit.models.bridge_base import BRIDGES, Bridge
from vlmkit.models.detection import SLOT_ORDERS, DetectionHead, group_objects, head_groups, sort_objects

LOCATIONS = ("digits", "none")
LAYOUTS = ("object", "labels_first")


# ------------------------------------------------------------------------------------------- configs
@dataclass
class DetectorConfig:
    """A per-patch detection head on the tower's features: for every patch, probabilities over each label
    group's words (plus background) and the box of the object the patch belongs to. `vlmkit pretrain-vision`
    trains one on records with `meta.objects` and saves it as `detection_head.safetensors` +
    `detection_head.json` in its output directory.

    `path`: that directory (its weights and label groups are loaded when the model is built); `groups`: label
    group -> label words (read from `path` when empty). A patch is part of an object when its objectness
    (1 - the mean background probability over the groups) exceeds `threshold`; patches, then objects, whose
    boxes overlap by IoU >= `iou` are one object.
    """

    path: str | None = None
    groups: dict[str, list[str]] = field(default_factory=dict)
    threshold: float = 0.5
    iou: float = 0.5

    @property
    def enabled(self) -> bool:
        return bool(self.groups or self.path)


@dataclass
class SlotsConfig:
    """The `object_slots` layout: `num` objects (the most confident ones, sorted by box centre: `order`
    `left_to_right` (x, then y) or `top_to_bottom` (y, then x)), each one word-mixture token per label group,
    then its location tokens; empty slots are `empty_word` tokens. `location`: `digits` (the box's x1 y1 x2 y2,
    each times `location_scale`, rounded, as fixed-width digit tokens: 64 gives the pixels of a 64-px image,
    1000 Qwen-VL's bins) or `none`. `layout`: `object` (each slot's words then its box) or `labels_first`
    (every slot's words, then every slot's box). `index`: each found object's slot starts with its number
    (1, 2, ... as digit tokens, as Set-of-Mark prompting numbers regions); an empty slot starts with
    `empty_word` instead. `separator`: a word (e.g. ",") closing every found object's slot (after its box in
    the `object` layout, after its words in `labels_first`; an empty slot ends with `empty_word`), "" for none.
    Empty slots are all `empty_word`, so the numbers and separators count the objects found. `count`: the
    slots are preceded by one token, the number of objects found (0 .. `num`) as a word, the detector's own
    count stated once rather than left to be counted from the slots. `prefix`: a word (e.g. "a") starting every
    found object's slot (before its number), so that a slot reads like a noun phrase; an empty slot starts with
    `empty_word` instead."""

    num: int = 4
    location: str = "digits"
    location_scale: int = 64
    layout: str = "object"
    order: str = "left_to_right"
    empty_word: str = "."
    index: bool = False
    separator: str = ""
    count: bool = False
    prefix: str = ""


@dataclass
class VocabMixtureConfig(BridgeConfig):
    """`vocab_mixture` (Ovis): `vocab_size` rows of visual vocabulary, the first ones starting from the LLM's
    embeddings of `vocab_words`; or, with a `detector`, one token per label group per position over the group's
    words (background: `empty_word`)."""

    vocab_size: int = 256
    vocab_words: list[str] = field(default_factory=list)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    empty_word: str = "."


@dataclass
class ObjectSlotsConfig(BridgeConfig):
    """`object_slots`: the `detector`'s objects laid out as `slots`."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    slots: SlotsConfig = field(default_factory=SlotsConfig)


_TINY_GROUPS = {"color": ["red", "blue"], "shape": ["circle", "square"]}


def _tiny_configs(kind: str) -> Callable[[], dict[str, BridgeConfig]]:
    if kind == "vocab_mixture":
        return lambda: {
            "vocab_mixture": VocabMixtureConfig(kind=kind, vocab_size=8, vocab_words=["red", "circle"]),
            "detector": VocabMixtureConfig(kind=kind, detector=DetectorConfig(groups=dict(_TINY_GROUPS))),
        }
    return lambda: {kind: ObjectSlotsConfig(kind=kind, detector=DetectorConfig(groups=dict(_TINY_GROUPS)))}


def embed_words(llm: Any, words: Sequence[str], leading_space: bool = True) -> torch.Tensor:
    """The LLM's input embeddings of `words` [n, D]: a word's token embedding, or the mean of its tokens' when
    the tokenizer splits it. `leading_space`: embed " word" (how a word inside a sentence is tokenized)."""
    table = llm.embeddings.weight.detach()
    rows = []
    for word in words:
        ids = llm.tokenizer(f" {word}" if leading_space else word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"the tokenizer gives no tokens for the word {word!r}")
        rows.append(table[ids].float().mean(dim=0))
    return torch.stack(rows).to(table.dtype)


def embedding_rms(llm: Any) -> float:
    """RMS of the LLM's input-embedding table (the scale its word vectors live at)."""
    return float(llm.embeddings.weight.detach().float().pow(2).mean().sqrt())


class WordTable(nn.Module):
    """An embedding table whose first rows start as the LLM's embeddings of `words` (`bind_llm`); further
    rows (`extra`) start random at the embedding scale. Before binding all rows are small random vectors."""

    def __init__(self, words: Sequence[str], dim: int, extra: int = 0, leading_space: bool = True) -> None:
        super().__init__()
        self.words, self.leading_space = list(words), leading_space
        self.weight = nn.Parameter(torch.randn(len(self.words) + extra, dim) * 0.02)

    def bind_llm(self, llm: Any) -> None:
        with torch.no_grad():
            n = len(self.words)
            if n:
                self.weight[:n] = embed_words(llm, self.words, self.leading_space).to(self.weight.dtype)
            if len(self.weight) > n:
                self.weight[n:] = torch.randn_like(self.weight[n:]) * embedding_rms(llm)

    def mix(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [..., rows] -> [..., D]: the probability-weighted sum of the rows."""
        return probs.to(self.weight.dtype) @ self.weight


def _detector(vision_dim: int, cfg: VocabMixtureConfig | ObjectSlotsConfig, who: str) -> DetectionHead:
    """The bridge's detection head: label groups from the config or from `detector.path`, weights from there."""
    det = cfg.detector
    groups = det.groups or (head_groups(det.path) if det.path else {})
    if not groups:
        raise ValueError(
            f"{who} needs a detection head: set bridge.detector.groups (label group -> words) or "
            "bridge.detector.path (a `vlmkit pretrain-vision` directory with detection_head.safetensors)"
        )
    head = DetectionHead(vision_dim, groups)
    if det.path:
        head.load(det.path)
    return head


def uses_detector(cfg: BridgeConfig) -> bool:
    """Whether a bridge config builds a detection head (so a pretrained one should be loaded into it)."""
    detector = getattr(cfg, "detector", None)
    return cfg.kind == "object_slots" or (cfg.kind == "vocab_mixture" and bool(detector and detector.enabled))


@BRIDGES.register("vocab_mixture", config=VocabMixtureConfig, tiny=_tiny_configs("vocab_mixture"))
class VocabMixtureBridge(Bridge):
    """Ovis-style probabilistic tokens: per position p = softmax(head(x)) over a vocabulary, token = p @ table.

    Without a detector: a linear head over `vocab_size` rows, the first starting from the LLM's embeddings of
    `vocab_words` (all trainable). With one (`bridge.detector`): per position one token per label group,
    mixing the LLM's embeddings of [`empty_word`, the group's words] by the head's [background, label]
    probabilities. M = N (or N x groups).
    """

    def __init__(self, vision_dim: int, llm_dim: int, cfg: VocabMixtureConfig) -> None:
        super().__init__(vision_dim, llm_dim, cfg)
        self.head: nn.Module
        if cfg.detector.enabled:
            self.head = _detector(vision_dim, cfg, "vocab_mixture")
            self.tables = nn.ModuleList(
                WordTable([cfg.empty_word, *words], llm_dim) for words in self.head.groups.values()
            )
        else:
            size = max(cfg.vocab_size, len(cfg.vocab_words))
            if size < 1:
                raise ValueError("vocab_mixture needs bridge.vocab_size >= 1 or bridge.vocab_words")
            self.head = nn.Linear(vision_dim, size)
            self.tables = nn.ModuleList([WordTable(cfg.vocab_words, llm_dim, size - len(cfg.vocab_words))])

    def bind_llm(self, llm: Any) -> None:
        for table in self.tables:
            table.bind_llm(llm)

    def num_tokens(self, n: int) -> int:
        return n * len(self.tables)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if isinstance(self.head, DetectionHead):
            probs = self.head(features).probs  # per group [B, N, 1 + n_g]
        else:
            probs = [self.head(features).float().softmax(dim=-1)]  # [B, N, V]
        tokens = torch.stack([t.mix(p) for t, p in zip(self.tables, probs)], dim=2)  # [B, N, G, Dl]
        return tokens.flatten(1, 2)  # [B, N*G, Dl]: a position's group tokens are consecutive


@BRIDGES.register("object_slots", config=ObjectSlotsConfig, tiny=_tiny_configs("object_slots"))
class ObjectSlotsBridge(Bridge):
    """Object slots from a detection head (`bridge.detector`), laid out by `bridge.slots`.

    Patches whose objectness passes `detector.threshold` are grouped into objects (`group_objects`); the
    `slots.num` most massive are sorted (`slots.order`) and each becomes, per label group, the
    objectness-weighted mixture of the LLM's embeddings of the group's words, then (`slots.location: digits`)
    its box x1 y1 x2 y2 times `slots.location_scale`, rounded, as fixed-width digit-word embeddings. Unused
    slots are `slots.empty_word` embeddings. With `slots.index` each found object's slot starts with its number,
    with `slots.separator` each found object's slot ends with that word, with `slots.count` the slots are preceded by
    the number of objects found. M = count + num x (index + groups + 4 x digits per coordinate + separator) for
    any N.
    The label mixtures are differentiable in the head's outputs; which patches form an object and the box
    digits are discrete.
    """

    def __init__(self, vision_dim: int, llm_dim: int, cfg: ObjectSlotsConfig) -> None:
        super().__init__(vision_dim, llm_dim, cfg)
        slots = cfg.slots
        if slots.num < 1:
            raise ValueError(f"bridge.slots.num must be >= 1, got {slots.num}")
        if slots.location not in LOCATIONS:
            raise ValueError(
                f"unknown bridge.slots.location '{slots.location}'; known: {', '.join(LOCATIONS)}"
            )
        if slots.layout not in LAYOUTS:
            raise ValueError(f"unknown bridge.slots.layout '{slots.layout}'; known: {', '.join(LAYOUTS)}")
        if slots.order not in SLOT_ORDERS:
            raise ValueError(f"unknown bridge.slots.order '{slots.order}'; known: {', '.join(SLOT_ORDERS)}")
        if slots.location == "digits" and slots.location_scale < 1:
            raise ValueError(f"bridge.slots.location_scale must be >= 1, got {slots.location_scale}")
        self.head = _detector(vision_dim, cfg, "object_slots")
        self.tables = nn.ModuleList(WordTable(words, llm_dim) for words in self.head.groups.values())
        self.filler = WordTable([slots.empty_word], llm_dim)
        self.digits = WordTable([str(d) for d in range(10)], llm_dim, leading_space=False)
        self.width = len(str(slots.location_scale)) if slots.location == "digits" else 0
        # only when used: models saved before these options load unchanged
        self.numbers = WordTable([str(k + 1) for k in range(slots.num)], llm_dim) if slots.index else None
        self.separator = (
            WordTable([slots.separator], llm_dim, leading_space=False) if slots.separator else None
        )
        self.counts = WordTable([str(k) for k in range(slots.num + 1)], llm_dim) if slots.count else None
        self.prefix = WordTable([slots.prefix], llm_dim) if slots.prefix else None

    def bind_llm(self, llm: Any) -> None:
        for table in self.modules():  # every word table this layout uses (the optional ones only when set)
            if isinstance(table, WordTable):
                table.bind_llm(llm)

    @property
    def labels_per_slot(self) -> int:
        """Tokens of a slot's words: its prefix word, its number (`slots.index`), then one per label group."""
        return int(bool(self.cfg.slots.prefix)) + int(self.cfg.slots.index) + len(self.tables)

    @property
    def locations_per_slot(self) -> int:
        return 4 * self.width

    def num_tokens(self, n: int) -> int:
        closing = int(bool(self.cfg.slots.separator))
        per_slot = self.labels_per_slot + self.locations_per_slot + closing
        return int(self.cfg.slots.count) + self.cfg.slots.num * per_slot

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        det = self.head(features)
        objectness = det.objectness  # [B, N]
        slots = self.cfg.slots
        images = []
        for b in range(features.shape[0]):
            found = group_objects(
                objectness[b], det.boxes[b], self.cfg.detector.threshold, self.cfg.detector.iou
            )
            objects = sort_objects(found[: slots.num], slots.order)
            labels, locations = [], []
            filler = self.filler.weight[0]
            for k, obj in enumerate(objects):
                w = obj.weights  # [N]
                mixed = [
                    table.mix(w @ p[b, :, 1:] / (w @ p[b, :, 1:]).sum().clamp(min=1e-8))  # [Dl]
                    for table, p in zip(self.tables, det.probs)
                ]
                if self.numbers is not None:
                    mixed.insert(0, self.numbers.weight[k])
                if self.prefix is not None:
                    mixed.insert(0, self.prefix.weight[0])
                labels.append(torch.stack(mixed))  # [labels_per_slot, Dl]
                locations.append(self._location_tokens(obj.box))  # [4 * width, Dl]
            empty = slots.num - len(objects)
            labels += [filler.expand(self.labels_per_slot, -1)] * empty
            locations += [filler.expand(self.locations_per_slot, -1)] * empty
            if self.separator is not None:  # every found object's slot closed by the separator word
                ends = [self.separator.weight[:1]] * len(objects) + [filler[None]] * empty
                if slots.layout == "object":
                    locations = [torch.cat([loc, end]) for loc, end in zip(locations, ends)]
                else:
                    labels = [torch.cat([lab, end]) for lab, end in zip(labels, ends)]
            if slots.layout == "object":
                parts = [t for pair in zip(labels, locations) for t in pair]
            else:
                parts = [*labels, *locations]
            if self.counts is not None:  # the number of objects found, before the slots
                parts.insert(0, self.counts.weight[len(objects)][None])
            images.append(torch.cat(parts))  # [M, Dl]
        return torch.stack(images)  # [B, M, Dl]

    def _location_tokens(self, box: torch.Tensor) -> torch.Tensor:
        """box [4] (0..1) -> [4 * width, Dl] digit embeddings of round(box * location_scale), zero-padded."""
        if not self.width:
            return self.digits.weight[:0]
        scale = self.cfg.slots.location_scale
        values = (box.clamp(0, 1) * scale).round().long().tolist()
        digits = [int(c) for v in values for c in str(v).zfill(self.width)]
        return self.digits.weight[torch.tensor(digits)]
