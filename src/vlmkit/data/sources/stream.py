"""The order of sharded records in an epoch: shards shuffled by (seed, epoch), one contiguous share per rank,
records shuffled in bounded blocks. Every position is a pure function of (epoch, offset), so a stream restarts
anywhere without reading what came before (whole shards are skipped by their record counts)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import torch

from vlmkit.data.sources.shards import RawRecord, Shard, read_shard

# records of one block -> the order to yield them in (a permutation of range(len(records)))
BlockOrder = Callable[[list[RawRecord], torch.Generator], list[int]]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across processes and Python versions)."""
    text = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def shuffled(records: list[RawRecord], generator: torch.Generator) -> list[int]:
    return torch.randperm(len(records), generator=generator).tolist()


@dataclass(frozen=True)
class ShardPlan:
    """Which records a rank reads in an epoch, and in what order.

    Per epoch the shards are permuted (seed, epoch) and concatenated; rank r takes the records
    [r * n, (r + 1) * n) of that sequence, n = total // world (the last total % world are left out), so ranks
    never overlap and each reads about 1/world of the shards. Within its share, a rank's records are cut into
    blocks of `block` records, each reordered by `order` with a generator seeded by (seed, epoch, rank, block).
    """

    shards: Sequence[Shard]
    seed: int = 0
    rank: int = 0
    world: int = 1
    block: int = 1000

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"data.shuffle_buffer must be at least 1, not {self.block}")

    @property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def per_rank(self) -> int:
        """Records each rank reads per epoch."""
        return self.total // self.world

    def shard_order(self, epoch: int) -> list[Shard]:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1))
        return [self.shards[i] for i in torch.randperm(len(self.shards), generator=gen).tolist()]

    def raw(self, epoch: int, offset: int = 0) -> Iterator[RawRecord]:
        """This rank's records of `epoch` in shard order, from its `offset`-th on."""
        begin, end = self.rank * self.per_rank + offset, (self.rank + 1) * self.per_rank
        at = 0
        for shard in self.shard_order(epoch):
            lo, hi = at, at + shard.count
            at = hi
            if hi <= begin or shard.count == 0:
                continue
            if lo >= end:
                return
            yield from islice(read_shard(shard, max(0, begin - lo)), min(hi, end) - max(lo, begin))

    def ordered(self, epoch: int, offset: int = 0, order: BlockOrder = shuffled) -> Iterator[RawRecord]:
        """This rank's records of `epoch` in training order (blocks reordered), from its `offset`-th on."""
        first_block = offset // self.block
        raw = self.raw(epoch, first_block * self.block)
        block = first_block
        while True:
            records = list(islice(raw, self.block))
            if not records:
                return
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.rank, block, 2))
            drop = offset - first_block * self.block if block == first_block else 0
            for i in order(records, gen)[drop:]:
                yield records[i]
            block += 1
