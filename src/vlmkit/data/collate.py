"""Batching: a padding collator (explicit side), an optional packing wrapper and a length-grouped sampler."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypedDict, cast

import torch
from torch.utils.data import Sampler

from vlmkit.constants import IGNORE_INDEX
from vlmkit.log import get_logger

log = get_logger(__name__)

PADDING_SIDES = ("right", "left")


class ModelInputs(TypedDict, total=False):
    """What `VisionLanguageModel.forward(**batch)` takes; a collated batch carries a subset of it. Shapes: B rows,
    T tokens, I pixel tensors (images, or tiles under AnyRes) in row order."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, T]; None for packed rows (position_ids keep samples apart)
    pixel_values: torch.Tensor | None  # [I, 3, S, S]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX where no loss is taken
    position_ids: torch.Tensor  # [B, T], restarting at 0 for each packed sample
    image_counts: list[int]  # pixel tensors per row
    sample_ids: list[str]  # per row (packed rows: ids joined by "+")
    vision_features: torch.Tensor  # [I, N, Dv] cached tower outputs instead of pixel_values
    label_weights: torch.Tensor  # [B, T] per-token loss weights (per-sample loss averaging)
    image_sizes: list[tuple[int, int]]  # every image's (width, height), in pixel-tensor order


class Batch(ModelInputs, total=False):
    """A collated batch: the model's inputs plus bookkeeping the model does not take."""

    sample_index: torch.Tensor  # packed rows: [B, T] index into packed_ids, -1 on padding
    packed_ids: list[str]  # packed rows: the input samples' ids, in input order


# The keys `VisionLanguageModel.forward` accepts; a batch may carry more (e.g. `sample_index`).
MODEL_INPUT_KEYS = tuple(ModelInputs.__annotations__)


def model_inputs(batch: Mapping[str, Any]) -> ModelInputs:
    """The subset of a collated batch that `VisionLanguageModel.forward(**...)` accepts."""
    return cast(ModelInputs, {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch})


def _pixel_rows(sample: Mapping[str, Any]) -> int:
    """Pixel tensors a sample contributes (images, or tiles under AnyRes): its entry in `image_counts`.
    Items from a feature cache carry `vision_features` rows [I_k, N, Dv] instead, one per pixel row."""
    pixels = sample.get("pixel_values")
    if pixels is None:
        pixels = sample.get("vision_features")
    return 0 if pixels is None else int(pixels.shape[0])


def _concat_pixels(samples: Sequence[Mapping[str, Any]], key: str = "pixel_values") -> torch.Tensor | None:
    """All samples' pixel tensors [I_k, 3, S, S] -> [sum I_k, 3, S, S] in order (None when there are none);
    `key="vision_features"`: cached tower features [I_k, N, Dv] -> [sum I_k, N, Dv] the same way."""
    pixels = [s[key] for s in samples if s.get(key) is not None and len(s[key])]
    return torch.cat(pixels, dim=0) if pixels else None


def _with_features(batch: Batch, samples: Sequence[Mapping[str, Any]]) -> Batch:
    """Add `vision_features` [I, N, Dv] (in `samples` order) when the items carry cached features, and
    `image_sizes` (every image's (width, height), in the same order) when the items carry them."""
    if any(s.get("vision_features") is not None for s in samples):
        batch["vision_features"] = _concat_pixels(samples, "vision_features")
    if any(s.get("image_sizes") for s in samples):
        batch["image_sizes"] = [tuple(size) for s in samples for size in s.get("image_sizes") or ()]
    return batch


class Collator:
    """Pads a list of `VLMDataset` items into a batch; the one place padding happens.

    Returns input_ids [B, T], attention_mask [B, T], labels [B, T] (IGNORE_INDEX on pads; omitted when the
    items have no labels), pixel_values [I, 3, S, S] (every sample's images in order, None when there are
    none), image_counts list[int] (pixel tensors per row) and sample_ids list[str]. Items carrying cached
    tower features add vision_features [I, N, Dv], concatenated the same way.
    Use padding_side="right" for training and "left" for generation.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def _padded_length(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return longest if not m else -(-longest // m) * m

    def _pad(self, rows: Sequence[torch.Tensor], value: int, length: int) -> torch.Tensor:
        """Rows [T_k] -> [B, length] padded with `value` on `self.padding_side`."""
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row)
            if self.padding_side == "right":
                out[i, :n] = row
            else:
                out[i, length - n :] = row
        return out

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> Batch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        ids = [torch.as_tensor(s["input_ids"], dtype=torch.long) for s in samples]
        length = self._padded_length(max(len(r) for r in ids))
        input_ids = self._pad(ids, self.pad_token_id, length)  # [B, T]
        attention_mask = self._pad([torch.ones(len(r), dtype=torch.long) for r in ids], 0, length)  # [B, T]
        batch: Batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if all(s.get("labels") is not None for s in samples):
            labels = [torch.as_tensor(s["labels"], dtype=torch.long) for s in samples]
            batch["labels"] = self._pad(labels, IGNORE_INDEX, length)  # [B, T]
        batch["pixel_values"] = _concat_pixels(samples)  # [I, 3, S, S] | None
        batch["image_counts"] = [_pixel_rows(s) for s in samples]
        batch["sample_ids"] = [str(s.get("id", i)) for i, s in enumerate(samples)]
        return _with_features(batch, samples)


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign item indices (in the given order) to the first bin with room; an item longer than
    `capacity` gets a bin of its own."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


class PackingCollator:
    """Optional wrapper: packs several samples per row (first-fit up to `max_length` tokens).

    Returns input_ids [B', L], labels [B', L] (assistant-only labels kept; the first label of each packed
    sample and all padding are IGNORE_INDEX), position_ids [B', L] restarting at 0 for each sample (and for
    the padding tail), attention_mask None, pixel_values [I, 3, S, S] in packed order, image_counts per row,
    sample_ids per row (ids joined by "+"), and for per-sample losses: sample_index [B', L] (index into
    `packed_ids`, -1 on padding) and packed_ids list[str] (the input samples, in input order).

    With attention_mask None, position_ids restarting at 0 and no KV cache, transformers' mask builder
    (`find_packed_sequence_indices`) keeps attention within each packed sample (sdpa / eager / flex).
    Pass `model_inputs(batch)` to the model: `sample_index` and `packed_ids` are not model arguments.
    """

    def __init__(self, pad_token_id: int, max_length: int):
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.pad_token_id = int(pad_token_id)
        self.max_length = int(max_length)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> Batch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        if any(s.get("labels") is None for s in samples):
            raise ValueError("PackingCollator is for training: every sample needs labels")
        ids = [torch.as_tensor(s["input_ids"], dtype=torch.long) for s in samples]
        bins = first_fit([len(r) for r in ids], self.max_length)
        for b in bins:
            if len(b) == 1 and len(ids[b[0]]) > self.max_length:
                log.debug(
                    "sample %s (%d tokens) exceeds max_length=%d: packed alone",
                    samples[b[0]].get("id"),
                    len(ids[b[0]]),
                    self.max_length,
                )
        length = max(self.max_length, max(len(r) for r in ids))
        rows = len(bins)
        input_ids = torch.full((rows, length), self.pad_token_id, dtype=torch.long)  # [B', L]
        labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)  # [B', L]
        sample_index = torch.full((rows, length), -1, dtype=torch.long)  # [B', L]
        position_ids = torch.zeros((rows, length), dtype=torch.long)  # [B', L]
        order: list[int] = []
        for row, members in enumerate(bins):
            at = 0
            for k in members:
                n = len(ids[k])
                input_ids[row, at : at + n] = ids[k]
                labels[row, at : at + n] = torch.as_tensor(samples[k]["labels"], dtype=torch.long)
                labels[row, at] = IGNORE_INDEX  # never predicted from the previous sample's last token
                position_ids[row, at : at + n] = torch.arange(n)
                sample_index[row, at : at + n] = k
                at += n
                order.append(k)
            position_ids[row, at:] = torch.arange(length - at)  # padding: a "sequence" of its own
        packed = [samples[k] for k in order]
        batch: Batch = {
            "input_ids": input_ids,
            "attention_mask": None,
            "labels": labels,
            "position_ids": position_ids,
            "pixel_values": _concat_pixels(packed),  # [I, 3, S, S] | None, in packed order
            "image_counts": [sum(_pixel_rows(samples[k]) for k in members) for members in bins],
            "sample_ids": ["+".join(str(samples[k].get("id", k)) for k in members) for members in bins],
            "sample_index": sample_index,
            "packed_ids": [str(s.get("id", i)) for i, s in enumerate(samples)],
        }
        return _with_features(batch, packed)  # vision_features [I, N, Dv] in packed order, as pixel_values


def per_sample_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, sample_index: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-summed next-token loss and label-token counts per sample, for packed or padded batches.

    logits [B, T, V], labels [B, T] (unshifted, as the model takes them), sample_index [B, T] (-1: none)
    -> (loss_sum [num_samples], tokens [num_samples]). A label belongs to the sample of its own position.
    """
    shift_logits = logits[:, :-1].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:]  # [B, T-1]
    owner = sample_index[:, 1:]  # [B, T-1]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )  # [B*(T-1)]
    keep = (shift_labels.reshape(-1) != IGNORE_INDEX) & (owner.reshape(-1) >= 0)
    idx = owner.reshape(-1)[keep]
    loss = torch.zeros(num_samples, dtype=nll.dtype, device=nll.device).index_add_(0, idx, nll[keep])
    count = torch.zeros(num_samples, dtype=torch.long, device=nll.device).index_add_(
        0, idx, torch.ones_like(idx)
    )
    return loss, count


def sample_label_weights(labels: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """Per-position loss weights [B, T] that make a weighted token mean equal the mean over samples of each
    sample's mean token loss: 1 / (the sample's label count) at its label positions (labels as the model takes
    them: position t holds the target predicted from t-1), 0 elsewhere. Works for packed and padded batches."""
    owner = torch.where(labels != IGNORE_INDEX, sample_index, -1)  # [B, T]
    owner[:, 0] = -1  # the first position is never predicted
    flat = owner.reshape(-1)
    keep = flat >= 0
    counts = torch.zeros(int(flat.max().clamp(min=0)) + 1, dtype=torch.float32, device=labels.device)
    counts.index_add_(0, flat[keep], torch.ones_like(flat[keep], dtype=torch.float32))
    weights = torch.zeros(flat.shape, dtype=torch.float32, device=labels.device)
    weights[keep] = 1.0 / counts[flat[keep]]
    return weights.reshape(labels.shape)


def padded_sample_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """For a padded (unpacked) batch: row b's tokens belong to sample b; padding -> -1. [B, T] -> [B, T]."""
    rows = torch.arange(attention_mask.shape[0], device=attention_mask.device).unsqueeze(1)  # [B, 1]
    return torch.where(attention_mask.bool(), rows.expand_as(attention_mask), -1)


# ------------------------------------------------------------------------------------------- sampler
def length_grouped_indices(
    lengths: Sequence[int], batch_size: int, mega_batch_mult: int | None, generator: torch.Generator
) -> list[int]:
    """HF's recipe: shuffle, cut into mega-batches of `mega_batch_mult * batch_size`, sort each by length
    (longest first), and move the longest item of all to the front (an early OOM beats a late one)."""
    n = len(lengths)
    if mega_batch_mult is None:
        mega_batch_mult = max(min(n // (batch_size * 4), 50), 1)
    perm = torch.randperm(n, generator=generator).tolist()
    size = mega_batch_mult * batch_size
    megabatches = [sorted(perm[i : i + size], key=lambda j: -lengths[j]) for i in range(0, n, size)]
    if not megabatches:
        return []
    longest = max(range(len(megabatches)), key=lambda m: lengths[megabatches[m][0]])
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for mb in megabatches for i in mb]


class LengthGroupedSampler(Sampler[int]):
    """Yields indices so that consecutive `batch_size` chunks have similar lengths (as HF's sampler).

    The order depends only on (seed, epoch); call `set_epoch` each epoch. `state_dict()` records the epoch
    and how many indices of it were yielded, so `load_state_dict` resumes mid-epoch with exactly the rest.
    With a multi-worker DataLoader the sampler runs ahead of training (prefetch): save the consumed count
    instead, e.g. `{"epoch": e, "position": steps_done * batch_size}`.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_mult: int | None = None
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0
        self.position = 0  # indices of this epoch already yielded
        self._resume_from = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning (unless a state was just loaded for this same epoch)."""
        if epoch != self.epoch:
            self.epoch, self.position, self._resume_from = epoch, 0, 0

    def indices(self, epoch: int | None = None) -> list[int]:
        """The full index order of `epoch` (default: the current one)."""
        generator = torch.Generator().manual_seed(self.seed + (self.epoch if epoch is None else epoch))
        return length_grouped_indices(self.lengths, self.batch_size, self.mega_batch_mult, generator)

    def __iter__(self) -> Iterator[int]:
        order = self.indices()
        start, self._resume_from = self._resume_from, 0
        self.position = start
        for i in order[start:]:
            self.position += 1
            yield i

    def __len__(self) -> int:
        return len(self.lengths) - self._resume_from

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume: the next iteration yields the indices of `state["epoch"]` after `state["position"]`."""
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']} but this sampler uses {self.seed}")
        position = int(state["position"])
        if not 0 <= position <= len(self.lengths):
            raise ValueError(f"sampler position {position} is outside 0..{len(self.lengths)}")
        self.epoch = int(state["epoch"])
        self.position = self._resume_from = position
