"""The ShapesWorld generation hook: at each validation, answer the first N validation records and score them by
task (`train.eval_generation: N`, `train.eval_hook: shapesworld`) — accuracy per task next to the loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmkit.config import RecipeConfig
from vlmkit.shapesworld.scoring import evaluate_shapesworld
from vlmkit.train.data import prepare_data
from vlmkit.train.hooks import GENERATION_HOOKS


@GENERATION_HOOKS.register("shapesworld")
class TaskGenerationHook:
    """Generates answers for the first N validation records and scores them by task (ShapesWorld-style
    records with `task` / `answer` / `meta`): a generation metric next to the validation loss."""

    def __init__(self, recipe: RecipeConfig, run_dir: Path) -> None:
        self.recipe, self.run_dir = recipe, run_dir

    def __call__(self, model: Any, stage: Any, step: int) -> dict[str, float]:
        data = prepare_data(self.recipe.data, self.run_dir)
        source = stage.val_file or data.val
        if not source:
            return {}
        subset = self.run_dir / "eval-generation" / "val-subset.json"
        if not subset.is_file():
            subset.parent.mkdir(parents=True, exist_ok=True)
            records = json.loads(Path(source).read_text())[: self.recipe.train.eval_generation]
            subset.write_text(json.dumps(records))
        image_root = data.image_root or str(Path(source).parent)
        scores = evaluate_shapesworld(model.eval(), subset, image_root, batch_size=16, max_new_tokens=48)
        return {k: float(v) for k, v in scores.items() if not k.startswith("n_") and v is not None}
