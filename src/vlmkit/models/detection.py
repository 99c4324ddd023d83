"""A per-patch detection head on a vision tower's features: label-group probabilities, a box, objects."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

HEAD_WEIGHTS = "detection_head.safetensors"
HEAD_META = "detection_head.json"


@dataclass
class Detections:
    """The head's output for a batch of images (N patches each).

    probs: per label group, [B, N, 1 + n_words] (index 0 is background); boxes [B, N, 4] as x1, y1, x2, y2 in
    0..1 of the tower's input image: for every patch, the box of the object it belongs to.
    """

    probs: list[torch.Tensor]
    boxes: torch.Tensor

    @property
    def objectness(self) -> torch.Tensor:
        """[B, N]: 1 - the background probability, averaged over the label groups."""
        return 1.0 - torch.stack([p[..., 0] for p in self.probs]).mean(dim=0)


@dataclass
class DetectedObject:
    """One object of one image: `weights` [N] (the objectness of the patches that make it up, 0 elsewhere) and
    its box [4] (weighted mean of those patches' boxes, 0..1)."""

    weights: torch.Tensor
    box: torch.Tensor

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box.tolist()
        return (x1 + x2) / 2, (y1 + y2) / 2


class DetectionHead(nn.Module):
    """LayerNorm + one linear layer per patch: logits over background + each label group's words, and a box.

    The layout (`dense.0` LayerNorm, `dense.1` Linear with outputs [group 1 (1 + n1), group 2 (1 + n2), ...,
    box (4)]) is the one `vlmkit pretrain-vision` trains on records with `meta.objects`.
    """

    def __init__(self, dim: int, groups: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        if not groups or any(not words for words in groups.values()):
            raise ValueError(f"a detection head needs label groups with at least one word each, got {groups}")
        self.groups = {name: list(words) for name, words in groups.items()}
        self.sizes = [1 + len(words) for words in self.groups.values()]
        self.dense = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, sum(self.sizes) + 4))

    def logits(self, features: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """features [B, N, D] -> (per group logits [B, N, 1 + n_g], box logits [B, N, 4]), computed in fp32
        whatever the model's dtype or autocast: thresholds, IoU grouping and box digits are discrete decisions,
        and bf16 logits (8 mantissa bits) flip them where fp32 would not."""
        norm, linear = self.dense
        with torch.autocast(features.device.type, enabled=False):
            x = nn.functional.layer_norm(
                features.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps
            )
            out = nn.functional.linear(x, linear.weight.float(), linear.bias.float())
        return list(out[..., :-4].split(self.sizes, dim=-1)), out[..., -4:]

    def forward(self, features: torch.Tensor) -> Detections:
        logits, box = self.logits(features)
        return Detections([lg.float().softmax(dim=-1) for lg in logits], box.float().sigmoid())

    # -------------------------------------------------------------------------------------- files
    def save(self, out_dir: str | Path) -> Path:
        """Write `detection_head.safetensors` and `detection_head.json` (label groups, feature width)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (HEAD_WEIGHTS + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))
        os.replace(tmp, out / HEAD_WEIGHTS)
        meta = {"groups": self.groups, "dim": self.dense[1].in_features}
        (out / (HEAD_META + ".tmp")).write_text(json.dumps(meta, indent=1))
        os.replace(out / (HEAD_META + ".tmp"), out / HEAD_META)
        return out

    def load(self, path: str | Path) -> None:
        """Load weights saved by `save` (or `vlmkit pretrain-vision`); the label groups must be the same."""
        from safetensors.torch import load_file

        meta = read_head_meta(path)
        if meta["groups"] != self.groups:
            raise ValueError(
                f"detection head in {path} has label groups {meta['groups']}, the model expects {self.groups}"
            )
        missing, unexpected = self.load_state_dict(load_file(str(Path(path) / HEAD_WEIGHTS)), strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"{Path(path) / HEAD_WEIGHTS}: missing={missing[:4]} unexpected={unexpected[:4]}"
            )


def read_head_meta(path: str | Path) -> dict:
    """`detection_head.json` of a directory, with a clear error when it is not there."""
    file = Path(path) / HEAD_META
    if not file.is_file() or not (Path(path) / HEAD_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"bridge.detector.path '{path}': no {HEAD_WEIGHTS} + {HEAD_META} there (`vlmkit pretrain-vision` "
            "writes them when its records carry meta.objects)"
        )
    return json.loads(file.read_text())


def head_groups(path: str | Path) -> dict[str, list[str]]:
    """The label groups of a saved detection head."""
    return {k: list(v) for k, v in read_head_meta(path)["groups"].items()}


# ------------------------------------------------------------------------------------------- objects
def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: a [n, 4], b [m, 4] -> [n, m]."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-8)


def group_objects(
    objectness: torch.Tensor, boxes: torch.Tensor, threshold: float = 0.5, iou: float = 0.5
) -> list[DetectedObject]:
    """The objects of one image from its patches: objectness [N], boxes [N, 4] (0..1).

    Patches above `threshold`, most confident first, join the first object whose seed patch's box overlaps
    theirs by IoU >= `iou` (else they start one); then objects whose mean boxes overlap that much are merged.
    An object's box is the objectness-weighted mean of its patches' boxes. Returned most massive first.
    """
    with torch.no_grad():
        keep = (objectness > threshold).nonzero().flatten()
        if len(keep) == 0:
            return []
        keep = keep[objectness[keep].argsort(descending=True)]
        overlap = box_iou(boxes[keep].float(), boxes[keep].float()).tolist()
        seeds: list[int] = []  # positions in `keep`
        members: list[list[int]] = []
        for i in range(len(keep)):
            for k, seed in enumerate(seeds):
                if overlap[i][seed] >= iou:
                    members[k].append(int(keep[i]))
                    break
            else:
                seeds.append(i)
                members.append([int(keep[i])])
        groups = members
        while len(groups) > 1:  # merge objects whose mean boxes overlap
            means = torch.stack([_mean_box(objectness, boxes, g) for g in groups])
            pair = box_iou(means, means).fill_diagonal_(0).max(dim=1)
            first = int(pair.values.argmax())
            if pair.values[first] < iou:
                break
            second = int(pair.indices[first])
            groups[first] = groups[first] + groups[second]
            del groups[second]
    objects = []
    for g in groups:
        weights = torch.zeros_like(objectness)
        index = torch.tensor(g)
        weights = weights.index_put((index,), objectness[index])  # differentiable in objectness
        objects.append(DetectedObject(weights, _mean_box(objectness, boxes, g).detach()))
    objects.sort(key=lambda o: -float(o.weights.detach().sum()))
    return objects


def _mean_box(objectness: torch.Tensor, boxes: torch.Tensor, patches: list[int]) -> torch.Tensor:
    index = torch.tensor(patches)
    w = objectness[index].detach().float()
    return (boxes[index].detach().float() * w[:, None]).sum(dim=0) / w.sum().clamp(min=1e-8)


SLOT_ORDERS = ("left_to_right", "top_to_bottom")


def sort_objects(objects: Sequence[DetectedObject], order: str = "left_to_right") -> list[DetectedObject]:
    """Objects by box centre: `left_to_right` (x, then y: the order of a left-to-right caption) or
    `top_to_bottom` (y, then x: reading order of rows)."""
    if order not in SLOT_ORDERS:
        raise ValueError(f"unknown slot order '{order}'; known: {', '.join(SLOT_ORDERS)}")
    swap = order == "top_to_bottom"

    def key(o: DetectedObject) -> tuple[float, float]:
        x, y = (round(v, 4) for v in o.center)
        return (y, x) if swap else (x, y)

    return sorted(objects, key=key)
