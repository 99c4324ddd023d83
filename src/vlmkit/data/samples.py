"""A sample, whatever file format it came from: a conversation (`Message` turns of text and image parts) with its
image references; and what is done to lists of them (a stage's task filter, merging one image's turns)."""

from __future__ import annotations

import random
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from vlmkit.constants import IMAGE_MARKER
from vlmkit.data.records import DataError
from vlmkit.log import get_logger

log = get_logger(__name__)


@dataclass
class Message:
    """One turn. `content` parts, in order: {"type": "text", "text": str} | {"type": "image"} (the i-th image
    part of a sample is `Sample.images[i]`)."""

    role: str
    content: list[dict[str, Any]]

    @property
    def text(self) -> str:
        """The turn's text parts joined (images left out)."""
        return "".join(p["text"] for p in self.content if p["type"] == "text")

    @property
    def num_images(self) -> int:
        return sum(1 for p in self.content if p["type"] == "image")


@dataclass
class Sample:
    """A conversation with its image references, whatever file format it came from."""

    id: str
    messages: list[Message]
    images: list[str]  # refs in order of appearance: relative/absolute paths, data: or http(s) URLs
    meta: dict[str, Any] = field(default_factory=dict)  # every other key of the record (task, answer, ...)


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def image_part() -> dict[str, Any]:
    return {"type": "image"}


def split_markers(text: str, marker: str = IMAGE_MARKER) -> list[dict[str, Any]]:
    """'a<image>b' -> [text 'a', image, text 'b'] (empty text parts dropped)."""
    parts: list[dict[str, Any]] = []
    for i, chunk in enumerate(text.split(marker)):
        if i:
            parts.append(image_part())
        if chunk:
            parts.append(text_part(chunk))
    return parts


def select_tasks(samples: Sequence[Sample], tasks: Sequence[str], source: str | Path = "") -> list[Sample]:
    """The samples whose record's `task` is one of `tasks` (a stage's `tasks:` filter), in order.

    A filter that keeps none of a non-empty list raises `DataError` naming the filter and the tasks found.
    """
    wanted = set(tasks)
    kept = [smp for smp in samples if smp.meta.get("task") in wanted]
    if samples and not kept:
        found = Counter(str(smp.meta["task"]) for smp in samples if "task" in smp.meta)
        held = [f"{n} '{task}'" for task, n in found.most_common(10)]
        untagged = sum("task" not in smp.meta for smp in samples)
        if untagged:
            held.append(f"{untagged} records have no `task` field")
        raise DataError(
            f"{source}: the stage's `tasks: [{', '.join(tasks)}]` filter keeps none of its {len(samples)} "
            f"samples ({'; '.join(held)}); remove the stage's `tasks` (--set stages.N.tasks=[]) or give the "
            "records a matching `task` field"
        )
    return kept


class Tagged(Protocol):
    """A sample before (`Sample`) or after (`EncodedSample`) encoding: an id and its record's other keys."""

    id: str
    meta: dict[str, Any]


TaggedT = TypeVar("TaggedT", bound=Tagged)


def weight_tasks(
    samples: Sequence[TaggedT], weights: dict[str, float], source: str | Path = "", seed: int = 0
) -> list[TaggedT]:
    """A stage's task mixture (`task_weights`): each sample whose record's `task` has weight w appears
    floor(w) times, plus once more for a share frac(w) of them (chosen by a hash of the sample id and `seed`,
    so the same samples every run); unlisted tasks keep weight 1, weight 0 drops a task. The batch order then
    shuffles the copies like any sample, so a task of weight 2 makes twice its share of the batches (the
    mixture ratios of LLaVA-style instruction data). Copies are the same objects (encoded once).

    A weighted task that no sample carries raises `DataError` (a typo would otherwise change nothing)."""
    bad = {t: w for t, w in weights.items() if not w >= 0}
    if bad:
        raise ValueError(f"task_weights must be >= 0, got {bad}")
    found = Counter(str(smp.meta.get("task")) for smp in samples)
    missing = [t for t in weights if t not in found]
    if missing:
        held = ", ".join(f"{n} '{t}'" for t, n in found.most_common(10))
        raise DataError(f"{source}: task_weights name tasks no record carries: {missing} (found: {held})")
    out: list[TaggedT] = []
    for smp in samples:
        w = weights.get(str(smp.meta.get("task")), 1.0)
        copies = int(w)
        if w > copies:
            u = zlib.crc32(f"{seed}:{smp.id}".encode()) / 2**32
            copies += u < w - copies
        out.extend([smp] * copies)
    if not out:
        raise DataError(f"{source}: task_weights {weights} leave no sample")
    after = Counter(str(smp.meta.get("task")) for smp in out)
    log.info("%s: task mixture %s", source, ", ".join(f"{t} {n} -> {after[t]}" for t, n in found.items()))
    return out


def merge_image_turns(samples: Sequence[Sample], seed: int = 0) -> list[Sample]:
    """Join the single-image samples that share one image into one multi-turn conversation per image.

    LLaVA-1.5 does this with VQA data: the image's tokens (and the template's preamble) are paid once for all
    of its questions instead of once per question. The turn order inside a conversation is shuffled with a
    stable per-image seed, so every kind of question is sometimes the first one (the turn an evaluation asks).
    The image stays in the first user turn; system turns after the first sample's are dropped. Samples with
    no image or several images pass through unchanged. The merged sample keeps the first sample's id and
    meta, plus `merged_ids` and `tasks` (each part's `task`, where it had one); images keep their first
    appearance order.
    """
    groups: dict[str, list[Sample]] = {}
    order: list[str | Sample] = []
    for smp in samples:
        if len(smp.images) != 1:
            order.append(smp)
            continue
        if smp.images[0] not in groups:
            groups[smp.images[0]] = []
            order.append(smp.images[0])
        groups[smp.images[0]].append(smp)
    merged: list[Sample] = []
    for item in order:
        if isinstance(item, Sample):
            merged.append(item)
            continue
        group = groups[item]
        if len(group) == 1:
            merged.append(group[0])
            continue
        rng = random.Random(zlib.crc32(f"{seed}:{item}".encode()))
        group = rng.sample(group, len(group))
        messages = list(group[0].messages)
        for smp in group[1:]:
            for msg in smp.messages:
                if msg.role == "system":
                    continue
                parts = [p for p in msg.content if p["type"] != "image"]
                if msg.role == "user":  # the marker's newline goes with the image
                    parts = [
                        dict(p, text=p["text"].lstrip("\n")) if p["type"] == "text" else p for p in parts
                    ]
                messages.append(Message(msg.role, parts))
        meta = dict(group[0].meta)
        meta["merged_ids"] = [smp.id for smp in group]
        meta["tasks"] = [smp.meta["task"] for smp in group if "task" in smp.meta]
        merged.append(Sample(group[0].id, messages, list(group[0].images), meta))
    return merged
