"""ShapesWorld as a data generator: `data.synthetic: {kind: shapesworld, ...}` writes train/val/test splits into
the run directory when a recipe names no data files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlmkit.config import GeneratedDataConfig
from vlmkit.data.generators import DATA_GENERATORS
from vlmkit.shapesworld.world import ALL_TASKS, generate_shapesworld


@dataclass
class ShapesWorldConfig(GeneratedDataConfig):
    """ShapesWorld scenes (`image_size` px, 1..`max_objects` objects) and their task records (`tasks`, empty:
    all); boxes written in `grounding_format`; `describe_first`: tasks (counting, pope, spatial) whose training
    answers first list the objects, then answer ("I see a red circle and a blue square, so 2.");
    `train_pope_binding`: the share of the train split's POPE negatives that are binding negatives (colour and
    shape both in the scene, on different objects) where the scene allows one; val and test are unchanged."""

    n_train: int = 200
    n_val: int = 50
    n_test: int = 50
    seed: int = 0
    image_size: int = 64
    max_objects: int = 3
    noise: bool = False
    tasks: list[str] = field(default_factory=list)
    grounding_format: str = "qwen"
    describe_first: list[str] = field(default_factory=list)
    train_pope_binding: float = 0.0


@DATA_GENERATORS.register("shapesworld", config=ShapesWorldConfig)
def generate(cfg: ShapesWorldConfig, out_dir: Path) -> dict[str, Path]:
    """Write the three splits (PNGs + LLaVA JSON) into `out_dir`; returns {split: json path}."""
    return generate_shapesworld(
        out_dir,
        n_scenes=cfg.n_train,
        seed=cfg.seed,
        image_size=cfg.image_size,
        tasks=cfg.tasks or ALL_TASKS,
        max_objects=cfg.max_objects,
        noise=cfg.noise,
        grounding_format=cfg.grounding_format,
        describe_first=cfg.describe_first,
        train_pope_binding=cfg.train_pope_binding,
        splits={"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test},
    )
