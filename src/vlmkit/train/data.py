"""Per-stage data: ShapesWorld generation when the recipe asks for it, datasets, batch order, resumable position."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import DataConfig, RecipeConfig, StageConfig
from vlmkit.data.collate import (
    Collator,
    LengthGroupedSampler,
    PackingCollator,
    model_inputs,
    padded_sample_index,
    sample_label_weights,
)
from vlmkit.data.dataset import VLMDataset
from vlmkit.log import get_logger

log = get_logger(__name__)


def prepare_data(cfg: DataConfig, run_dir: Path, is_main: bool = True, barrier: Any = None) -> DataConfig:
    """Resolve data files: generated ShapesWorld splits (into RUN_DIR/data) when `data.synthetic` is set and no
    `data.train` file is given. Returns a copy of the config with file paths filled in."""
    import dataclasses

    if cfg.train or cfg.synthetic is None:
        return cfg
    from vlmkit.data.synthetic import ALL_TASKS, generate_shapesworld

    syn = cfg.synthetic
    out = run_dir / "data"
    files = {s: out / f"{s}.json" for s in ("train", "val", "test")}
    if is_main and not all(f.is_file() for f in files.values()):
        generate_shapesworld(
            out,
            n_scenes=syn.n_train,
            seed=syn.seed,
            image_size=syn.image_size,
            tasks=syn.tasks or ALL_TASKS,
            max_objects=syn.max_objects,
            noise=syn.noise,
            grounding_format=syn.grounding_format,
            describe_first=syn.describe_first,
            splits={"train": syn.n_train, "val": syn.n_val, "test": syn.n_test},
        )
    if barrier is not None:
        barrier()
    return dataclasses.replace(
        cfg, train=str(files["train"]), val=str(files["val"]), test=str(files["test"]), image_root=str(out)
    )


@dataclass
class StageData:
    """The stage's train/val datasets and a deterministic, resumable batch order (epoch, batch position)."""

    train: VLMDataset
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
        if stage.loss_average not in ("token", "sample"):
            raise ValueError(
                f"stage '{stage.name}': loss_average must be 'token' or 'sample', not '{stage.loss_average}'"
            )
        tasks = stage.tasks or None
        processor = model.processor
        train = VLMDataset.from_config(
            data_cfg, train_file, processor, tasks=tasks, merge_turns=data_cfg.merge_turns
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
        )
        if recipe.train.feature_cache:
            from vlmkit.train.feature_cache import maybe_feature_cache

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
        return len(self.train) // self.global_batch

    def epoch_order(self, epoch: int) -> list[int]:
        if self.group_by_length:
            sampler = LengthGroupedSampler(
                self.train.lengths, self.global_batch, seed=self.seed, mega_batch_mult=self.length_group_mult
            )
            sampler.set_epoch(epoch)
            return list(sampler.indices())
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.train), generator=gen).tolist()

    def next_batch(self, epoch: int, batch_pos: int) -> tuple[dict[str, Any], int, int]:
        """The micro-batch at (epoch, batch_pos) for this rank, and the position after it."""
        if batch_pos >= self.steps_per_epoch:
            epoch, batch_pos = epoch + 1, 0
        order = self.epoch_order(epoch)
        start = batch_pos * self.global_batch
        indices = order[start : start + self.global_batch][
            self.rank * self.batch_size : (self.rank + 1) * self.batch_size
        ]
        return self._collate([self.train[i] for i in indices]), epoch, batch_pos + 1

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(items)
        if self.feature_cache is not None:
            batch = self.feature_cache.replace_pixels(batch, items)
        if self.loss_average == "sample" and batch.get("labels") is not None:
            owner = batch.get("sample_index")
            if owner is None:
                owner = padded_sample_index(batch["attention_mask"])
            batch["label_weights"] = sample_label_weights(batch["labels"], owner)
        batch = model_inputs(batch)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

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
