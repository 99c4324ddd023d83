"""Batches built off the training thread: a `torch.utils.data.DataLoader` over a stream of micro-batches, each a
pure function of its (epoch, position), so the order never depends on the number of workers and a run resumes
at any position exactly.

Two streams: `DatasetBatches` (a validated `VLMDataset`, random access; the order of `BatchOrder`) and
`ShardBatches` (records read lazily from WebDataset / Parquet shards, see `sources.stream.ShardPlan`). Worker
w of W builds the stream's batches w, w + W, w + 2W, ...; the DataLoader hands them out round-robin, so the
training loop sees them in position order. Everything a worker holds (dataset or shard plan, processor,
collator, feature cache) pickles, and none of it is the model.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlmkit.data.collate import (
    Batch,
    length_grouped_indices,
    model_inputs,
    padded_sample_index,
    sample_label_weights,
)
from vlmkit.data.dataset import RecordEncoder
from vlmkit.data.sources.shards import RawRecord
from vlmkit.data.sources.stream import ShardPlan, mix_seed
from vlmkit.log import get_logger

log = get_logger(__name__)

POSITION_KEY = "data_position"  # (epoch, position) of the batch: checked by `BatchLoader`
REPORT_KEY = "data_report"  # sharded data: {"records": n, "rejected": [(reason, sample id, message)]}


# ------------------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed `random`, `numpy` and torch's CPU generator for the block, then restore their states: whatever
    randomness a batch's transforms use depends on the batch alone, not on the worker or the training RNG."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def next_position(epoch: int, pos: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, pos) with a finished epoch rolled over to the next one's start."""
    return (epoch + 1, 0) if pos >= steps_per_epoch else (epoch, pos)


@dataclass
class BatchAssembler:
    """Items -> a model-ready batch, in the worker: the collator pads or packs, a feature cache swaps pixels for
    cached features, `loss_average: sample` adds per-position loss weights."""

    collate: Callable[[Sequence[dict[str, Any]]], dict[str, Any]]
    feature_cache: Any = None
    loss_average: str = "token"

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(items)
        if self.feature_cache is not None:
            batch = self.feature_cache.replace_pixels(batch, items)
        if self.loss_average == "sample" and batch.get("labels") is not None:
            owner = batch.get("sample_index")
            if owner is None:
                owner = padded_sample_index(batch["attention_mask"])
            batch["label_weights"] = sample_label_weights(batch["labels"], owner)
        return model_inputs(batch)


@dataclass
class BatchOrder:
    """Which samples of a map-style dataset make this rank's micro-batch at (epoch, position): a random
    permutation per epoch (or the length-grouped order), cut into global batches of batch_size x world, of
    which this rank takes its contiguous slice."""

    num_samples: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    lengths: Sequence[int] | None = None  # given: length-grouped order
    length_group_mult: int | None = None

    def __post_init__(self) -> None:
        self._cached: tuple[int, list[int]] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def epoch_order(self, epoch: int) -> list[int]:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.lengths is not None:
            gen = torch.Generator().manual_seed(
                self.seed + epoch
            )  # as LengthGroupedSampler(seed).indices(epoch)
            order = length_grouped_indices(self.lengths, self.global_batch, self.length_group_mult, gen)
        else:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        self._cached = (epoch, order)
        return order

    def indices(self, epoch: int, pos: int) -> list[int]:
        start = pos * self.global_batch + self.rank * self.batch_size
        return self.epoch_order(epoch)[start : start + self.batch_size]


# ------------------------------------------------------------------------------------------------ streams
class PositionStream(IterableDataset):
    """Batches from (epoch, position) `start` on, forever; in a DataLoader worker, only that worker's share."""

    def __init__(self, start: tuple[int, int], steps_per_epoch: int, seed: int = 0, rank: int = 0) -> None:
        if steps_per_epoch < 1:
            raise ValueError("a batch stream needs at least one batch per epoch")
        self.start, self.steps_per_epoch, self.seed, self.rank = start, steps_per_epoch, seed, rank

    def positions(self) -> Iterator[tuple[int, int]]:
        """This worker's (epoch, position)s: every num_workers-th from `start`, beginning at its worker id."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, pos = next_position(*self.start, self.steps_per_epoch)
        k = 0
        while True:
            if k % workers == worker:
                yield epoch, pos
            k += 1
            epoch, pos = next_position(epoch, pos + 1, self.steps_per_epoch)

    def make(self, epoch: int, pos: int) -> dict[str, Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for epoch, pos in self.positions():
            with seeded(mix_seed(self.seed, self.rank, epoch, pos)):
                batch = self.make(epoch, pos)
            batch[POSITION_KEY] = (epoch, pos)
            yield batch


class DatasetBatches(PositionStream):
    """Micro-batches of a validated map-style dataset (`VLMDataset`) in `BatchOrder`."""

    def __init__(self, dataset: Any, order: BatchOrder, assemble: BatchAssembler, start: tuple[int, int]):
        super().__init__(start, order.steps_per_epoch, order.seed, order.rank)
        self.dataset, self.order, self.assemble = dataset, order, assemble

    def make(self, epoch: int, pos: int) -> dict[str, Any]:
        return self.assemble([self.dataset[i] for i in self.order.indices(epoch, pos)])


class _Window:
    """A rank's records of one epoch in training order, read forward: `take` a window at an offset, `peek`
    past it (to borrow a usable record when a whole window is bad)."""

    def __init__(self, records: Iterator[RawRecord], offset: int) -> None:
        self.records, self.offset, self.ahead = records, offset, []  # ahead: read, not yet taken

    def _fill(self, n: int) -> bool:
        while len(self.ahead) < n:
            nxt = next(self.records, None)
            if nxt is None:
                return False
            self.ahead.append(nxt)
        return True

    def take(self, offset: int, n: int) -> list[RawRecord]:
        while self.offset < offset:  # other workers' windows: read, not decoded
            if not self.ahead and not self._fill(1):
                break
            self.ahead.pop(0)
            self.offset += 1
        self._fill(n)
        out, self.ahead = self.ahead[:n], self.ahead[n:]
        self.offset += len(out)
        return out

    def peek(self) -> Iterator[RawRecord]:
        i = 0
        while self._fill(i + 1):
            yield self.ahead[i]
            i += 1


class ShardBatches(PositionStream):
    """Micro-batches read lazily from shards: this rank's micro-batch at (epoch, position) is made of the
    records [position x batch_size, + batch_size) of its share of the epoch (`ShardPlan.ordered`).

    A record that cannot be used is dropped from its batch and reported (`REPORT_KEY`), so a batch may be
    smaller; a batch whose every record is bad takes the next usable record of the epoch instead (it is then
    seen twice that epoch). Batches hold no more than `batch_size` records; `plan.block` records are held to
    shuffle (and, with `lengths`, to sort by estimated length within mega-batches of `length_group_mult`
    batches)."""

    def __init__(
        self,
        plan: ShardPlan,
        encode: RecordEncoder,
        assemble: BatchAssembler,
        batch_size: int,
        start: tuple[int, int],
        group_by_length: bool = False,
        length_group_mult: int | None = None,
    ) -> None:
        super().__init__(start, plan.per_rank // batch_size, plan.seed, plan.rank)
        self.plan, self.encode, self.assemble, self.batch_size = plan, encode, assemble, batch_size
        self.group_by_length, self.length_group_mult = group_by_length, length_group_mult

    def block_order(self, records: list[RawRecord], generator: torch.Generator) -> list[int]:
        if not self.group_by_length:
            return torch.randperm(len(records), generator=generator).tolist()
        lengths = [self.encode.length(r) for r in records]
        return length_grouped_indices(lengths, self.batch_size, self.length_group_mult, generator)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        window: _Window | None = None
        window_epoch = -1
        for epoch, pos in self.positions():
            offset = pos * self.batch_size
            if window is None or window_epoch != epoch or window.offset > offset:
                window_epoch = epoch
                window = _Window(self.plan.ordered(epoch, offset, self.block_order), offset)
            records = window.take(offset, self.batch_size)
            with seeded(mix_seed(self.seed, self.rank, epoch, pos)):
                batch = self._batch(records, window, epoch, pos)
            batch[POSITION_KEY] = (epoch, pos)
            yield batch

    def _batch(self, records: list[RawRecord], window: _Window, epoch: int, pos: int) -> dict[str, Any]:
        items, rejected = [], []
        for raw in records:
            out = self.encode(raw)
            (rejected if isinstance(out, tuple) else items).append(out)
        if not items:  # every record of the window is bad: borrow the epoch's next usable one
            items = [next((it for it in map(self.encode, window.peek()) if isinstance(it, dict)), None)]
            if items[0] is None:
                reasons = sorted({r for r, _, _ in rejected})
                raise RuntimeError(
                    f"rank {self.rank}: no usable record from epoch {epoch} batch {pos} to the end of the "
                    f"epoch (rejected: {', '.join(reasons)}); see the data report"
                )
        batch = self.assemble(items)
        batch[REPORT_KEY] = {"records": len(records), "rejected": rejected}
        return batch


# ------------------------------------------------------------------------------------------------ loader
def _identity(batch: Any) -> Any:
    return batch


class BatchLoader:
    """`next_batch(epoch, pos)` served by a DataLoader that runs ahead of training.

    The DataLoader (`num_workers` processes, `prefetch_factor` batches each in flight, pinned memory when
    `pin_memory`) is started at the first request and again whenever a request is not the position right
    after the previous one (a resume, a jump); so the trainer only ever names the position it wants.
    """

    def __init__(
        self,
        stream: Callable[[int, int], PositionStream],
        steps_per_epoch: int,
        *,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0, not {num_workers}")
        if prefetch_factor < 1:
            raise ValueError(f"train.prefetch_factor must be >= 1, not {prefetch_factor}")
        self.stream, self.steps_per_epoch = stream, steps_per_epoch
        self.num_workers, self.prefetch_factor, self.pin_memory, self.seed = (
            num_workers,
            prefetch_factor,
            pin_memory,
            seed,
        )
        self._iter: Iterator[dict[str, Any]] | None = None
        self._next: tuple[int, int] | None = None

    def _start(self, epoch: int, pos: int) -> None:
        self.close()
        loader = DataLoader(
            self.stream(epoch, pos),
            batch_size=None,  # the stream yields whole batches
            collate_fn=_identity,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            pin_memory=self.pin_memory,
            # the workers' base seed comes from here, not from (and without advancing) the global RNG
            generator=torch.Generator().manual_seed(self.seed),
        )
        self._iter = iter(loader)

    def next_batch(self, epoch: int, pos: int) -> tuple[Batch, int, int]:
        """The micro-batch at (epoch, pos) and the position after it."""
        epoch, pos = next_position(epoch, pos, self.steps_per_epoch)
        if self._iter is None or self._next != (epoch, pos):
            self._start(epoch, pos)
        assert self._iter is not None
        batch = next(self._iter)
        got = batch.pop(POSITION_KEY)
        if tuple(got) != (epoch, pos):
            raise RuntimeError(f"data loader out of order: asked for batch {(epoch, pos)}, got {tuple(got)}")
        self._next = next_position(epoch, pos + 1, self.steps_per_epoch)
        return batch, epoch, pos + 1

    def close(self) -> None:
        """Stop the workers (a later `next_batch` starts them again)."""
        it, self._iter, self._next = self._iter, None, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
