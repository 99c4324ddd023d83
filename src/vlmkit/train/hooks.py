"""Generation hooks: what the trainer runs at each validation besides the loss (`train.eval_generation` records
generated and scored by the hook `train.eval_hook`). A hook class is registered here by a plugin and built as
`cls(recipe, run_dir)`; calling it with (model, stage, step) returns {metric: value} for metrics.jsonl."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlmkit.registry import Registry

GenerationHook = Callable[[Any, Any, int], dict[str, float]]
GENERATION_HOOKS: Registry[Callable[..., GenerationHook]] = Registry("generation hook")
