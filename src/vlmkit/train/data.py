"""Per-stage data: ShapesWorld generation when the recipe asks for it, datasets or shards, the resumable batch loader."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import DataConfig, RecipeConfig, StageConfig
from vlmkit.confio import to_dict
from vlmkit.data.collate import Batch, Collator, PackingCollator
from vlmkit.data.dataset import DataReport, RecordEncoder, VLMDataset
from vlmkit.data.generators import generate
from vlmkit.data.loader import (
    REPORT_KEY,
    BatchAssembler,
    BatchLoader,
    BatchOrder,
    DatasetBatches,
    PositionStream,
    ShardBatches,
)
from vlmkit.data.sources.shards import Shard, find_shards, is_sharded
from vlmkit.data.sources.stream import ShardPlan, mix_seed
from vlmkit.io import atomic_write_json
from vlmkit.log import get_logger
from vlmkit.train.feature_cache import maybe_feature_cache

log = get_logger(__name__)

GENERATOR_RECORD = "generator.json"  # the data.synthetic settings that wrote RUN_DIR/data


def prepare_data(cfg: DataConfig, run_dir: Path, is_main: bool = True, barrier: Any = None) -> DataConfig:
    """Resolve data files: splits written by the `data.synthetic` generator (into RUN_DIR/data) when no
    `data.train` file is given. Returns a copy of the config with file paths filled in."""
    if cfg.train or cfg.synthetic is None:
        return cfg
    out = run_dir / "data"
    files = {s: out / f"{s}.json" for s in ("train", "val", "test")}
    if is_main:
        settings = json.loads(json.dumps(to_dict(cfg.synthetic)))
        record = out / GENERATOR_RECORD
        if not all(f.is_file() for f in files.values()):
            files.update(generate(cfg.synthetic, out))
            atomic_write_json(record, settings)
        elif record.is_file() and (made := json.loads(record.read_text())) != settings:
            changed = sorted(k for k in {*made, *settings} if made.get(k) != settings.get(k))
            raise ValueError(
                f"{out} was generated with other data.synthetic settings ({', '.join(changed)}: "
                f"{', '.join(f'{made.get(k)!r} -> {settings.get(k)!r}' for k in changed)}); delete that "
                "directory to generate the data anew, or use another run directory"
            )
    if barrier is not None:
        barrier()
    return dataclasses.replace(
        cfg, train=str(files["train"]), val=str(files["val"]), test=str(files["test"]), image_root=str(out)
    )


@dataclass
class StageData:
    """The stage's train/val data and a deterministic, resumable batch order (epoch, batch position).

    `train` is a validated `VLMDataset` (JSON data) or a `ShardSource` (sharded data, read lazily). Batches are
    built by `BatchLoader` (data/loader.py): in `num_workers` DataLoader processes when > 0, each batch a pure
    function of its position, so the losses do not depend on the number of workers.
    """

    train: Any
    val: VLMDataset | None
    collate: Any
    batch_size: int
    seed: int
    group_by_length: bool
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    feature_cache: Any = None
    length_group_mult: int | None = None
    loss_average: str = "token"
    num_workers: int = 0
    prefetch_factor: int = 2
    max_bad: float = 1.0  # sharded data: the largest rejected share before `DataQualityError`

    def __post_init__(self) -> None:
        self._loader: BatchLoader | None = None

    @classmethod
    def build(
        cls, recipe: RecipeConfig, stage: StageConfig, model: Any, run_dir: Path, strategy: Any
    ) -> StageData:
        data_cfg = prepare_data(recipe.data, run_dir, strategy.is_main, strategy.barrier)
        train_file = stage.train_file or data_cfg.train
        if not train_file:
            raise ValueError(
                f"stage '{stage.name}' has no training data: set data.train, data.synthetic or "
                "the stage's train_file"
            )
        if stage.task_weights and data_cfg.merge_turns:
            raise ValueError(
                f"stage '{stage.name}': task_weights repeat records, which data.merge_turns would then join "
                "into conversations asking the same question twice; use one or the other"
            )
        if stage.loss_average not in ("token", "sample"):
            raise ValueError(
                f"stage '{stage.name}': loss_average must be 'token' or 'sample', not '{stage.loss_average}'"
            )
        tasks = stage.tasks or None
        processor = model.processor
        if is_sharded(train_file):
            train: Any = ShardSource.build(data_cfg, train_file, processor, stage)
        else:
            train = VLMDataset.from_config(
                data_cfg,
                train_file,
                processor,
                tasks=tasks,
                task_weights=stage.task_weights,
                merge_turns=data_cfg.merge_turns,
            )
        val_file = stage.val_file or data_cfg.val
        val = (
            VLMDataset.from_config(data_cfg, val_file, processor, tasks=tasks, enforce_max_bad=False)
            if val_file
            else None
        )
        pad = model.tokenizer.pad_token_id
        collate = PackingCollator(pad, data_cfg.max_length) if data_cfg.packing else Collator(pad, "right")
        global_batch = stage.batch_size * strategy.world
        if len(train) < global_batch:
            raise ValueError(
                f"stage '{stage.name}': {len(train)} training samples, fewer than one batch of {global_batch}"
            )
        data = cls(
            train,
            val,
            collate,
            stage.batch_size,
            recipe.train.seed,
            data_cfg.group_by_length,
            strategy.rank,
            strategy.world,
            getattr(strategy, "device", torch.device("cpu")),
            length_group_mult=data_cfg.length_group_mult,
            loss_average=stage.loss_average,
            num_workers=recipe.train.num_workers,
            prefetch_factor=recipe.train.prefetch_factor,
            max_bad=data_cfg.max_bad,
        )
        if recipe.train.feature_cache and isinstance(train, ShardSource):
            log.info("feature cache off: the training data is streamed from shards")
        elif recipe.train.feature_cache:
            data.feature_cache = maybe_feature_cache(
                model, data, run_dir, data_cfg, barrier=getattr(strategy, "barrier", None)
            )
        return data

    @property
    def num_samples(self) -> int:
        return len(self.train)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch (drop-last); the trainer divides by grad_accum."""
        return len(self.train) // self.world // self.batch_size

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, ShardSource)

    def _order(self) -> BatchOrder:
        lengths = self.train.lengths if self.group_by_length else None
        return BatchOrder(
            len(lengths) if lengths is not None else len(self.train),
            self.batch_size,
            self.seed,
            self.rank,
            self.world,
            lengths,
            self.length_group_mult,
        )

    def epoch_order(self, epoch: int) -> list[int]:
        """JSON data: every sample index of `epoch` in training order (all ranks' slices)."""
        return self._order().epoch_order(epoch)

    def _assembler(self) -> BatchAssembler:
        return BatchAssembler(self.collate, self.feature_cache, self.loss_average)

    def _stream(self, epoch: int, pos: int) -> PositionStream:
        if self.streamed:
            return self.train.batches(self, self._assembler(), (epoch, pos))
        return DatasetBatches(self.train, self._order(), self._assembler(), (epoch, pos))

    def loader(self) -> BatchLoader:
        """The DataLoader front for this rank (batches pinned for the copy when the device is CUDA)."""
        return BatchLoader(
            self._stream,
            self.steps_per_epoch,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            pin_memory=self.device.type == "cuda",
            seed=mix_seed(self.seed, self.rank),
        )

    def next_batch(self, epoch: int, batch_pos: int) -> tuple[Batch, int, int]:
        """The micro-batch at (epoch, batch_pos) for this rank, on the device, and the position after it."""
        if self._loader is None:
            self._loader = self.loader()
        batch, epoch, batch_pos = self._loader.next_batch(epoch, batch_pos)
        report = batch.pop(REPORT_KEY, None)
        if report is not None:
            self.train.count(report, epoch_done=batch_pos >= self.steps_per_epoch, max_bad=self.max_bad)
        return self._to_device(batch), epoch, batch_pos

    def close(self) -> None:
        """Stop the data-loader workers."""
        if self._loader is not None:
            self._loader.close()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        # pinned (CUDA): the copy overlaps with the host; the first kernel that reads the tensor waits for it
        non_blocking = self.device.type == "cuda"
        return {
            k: v.to(self.device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return self._to_device(self._assembler()(items))

    def val_batches(self, limit: int = 0) -> list[dict[str, Any]]:
        if self.val is None or len(self.val) == 0:
            return []
        # every rank gets the same number of batches (sharded models run collectives in each forward):
        # the split is padded to a multiple of the world size by wrapping around, as DistributedSampler does
        n = len(self.val)
        idx = [i % n for i in range(-(-n // self.world) * self.world)][self.rank :: self.world]
        chunks = [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if limit:
            chunks = chunks[:limit]
        return [self._collate([self.val[i] for i in chunk]) for chunk in chunks]


@dataclass
class ShardSource:
    """Sharded training data (WebDataset tar / Parquet), read lazily: the shards, how a record becomes an item,
    and the running `DataReport` of what this rank's batches skipped (merged from the workers)."""

    shards: list[Shard]
    encode: RecordEncoder
    report: DataReport
    shuffle_buffer: int = 1000
    # below this many records the rejected share is checked at epoch ends only (too few to judge)
    min_check: int = 1000

    @classmethod
    def build(cls, cfg: DataConfig, spec: str, processor: Any, stage: StageConfig) -> ShardSource:
        if stage.tasks or stage.task_weights:
            raise ValueError(
                f"stage '{stage.name}': tasks / task_weights filter or repeat records, which sharded data ({spec}) does "
                "not do while streaming; write the stage's records into shards of their own and name them in "
                "its train_file"
            )
        if cfg.merge_turns:
            raise ValueError(
                f"data.merge_turns groups a whole file's records by image, which sharded data ({spec}) cannot "
                "do while streaming; merge the records before `vlmkit data shard`"
            )
        shards = find_shards(spec)
        root = cfg.image_root if cfg.image_root is not None else (spec if Path(spec).is_dir() else None)
        encode = RecordEncoder(processor, cfg.format, root, cfg.max_length, tuple(cfg.caption_instructions))
        source = cls(shards, encode, DataReport(source=spec), cfg.shuffle_buffer)
        log.info("%s: %d records in %d shards (read while training)", spec, len(source), len(shards))
        return source

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def plan(self, seed: int, rank: int, world: int) -> ShardPlan:
        return ShardPlan(self.shards, seed, rank, world, self.shuffle_buffer)

    def batches(self, data: StageData, assemble: BatchAssembler, start: tuple[int, int]) -> ShardBatches:
        plan = self.plan(data.seed, data.rank, data.world)
        return ShardBatches(
            plan, self.encode, assemble, data.batch_size, start, data.group_by_length, data.length_group_mult
        )

    def count(self, part: dict[str, Any], epoch_done: bool, max_bad: float) -> None:
        """Add one batch's records to the report; raise `DataQualityError` past `max_bad`."""
        rejected = part["rejected"]
        for _ in range(part["records"] - len(rejected)):
            self.report.accept()
        for reason, sample_id, message in rejected:
            self.report.reject(reason, sample_id, message)
        if epoch_done:
            log.info(
                "%s: %s (this process, since the start or resume)", self.report.source, self.report.summary()
            )
        if epoch_done or self.report.total >= self.min_check:
            self.report.check(max_bad)
