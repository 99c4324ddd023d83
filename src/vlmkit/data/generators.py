"""Data generators: registered sources that write a recipe's train/val/test files into the run directory when
it names none (`data.synthetic: {kind: ...}`). A generator is `fn(cfg, out_dir) -> {split: json path}`,
registered with its own config class (a `GeneratedDataConfig`); the built-in one is the shapesworld plugin's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmkit.registry import Registry

Generator = Callable[[Any, Path], dict[str, Path]]
DATA_GENERATORS: Registry[Generator] = Registry("data generator")


def generate(cfg: Any, out_dir: Path) -> dict[str, Path]:
    """Run the generator `cfg.kind` into `out_dir`; returns {split: json path}."""
    return DATA_GENERATORS.get(cfg.kind)(cfg, out_dir)
