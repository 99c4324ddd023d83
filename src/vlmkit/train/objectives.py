"""Objectives that train parts of a model without the LLM (the vision tower's pretraining), run on the shared
loop (train/loop.py) with the shared schedule (train/schedule.py) and checkpoints (train/checkpoint.py): a kill
mid-run and `--resume` give the same weights as an uninterrupted run.

A new objective is one file: an `Objective` subclass and its config (a subclass of `ObjectiveConfig`),
registered with `@OBJECTIVES.register("name", config=MyConfig)`; a recipe's `pretrain_vision:` section (and
`vlmkit pretrain-vision --set objective=name`) picks it with `objective: name`.
"""

from __future__ import annotations

import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vlmkit.config import save_yaml
from vlmkit.confio import KindConfig
from vlmkit.log import get_logger
from vlmkit.registry import Registry
from vlmkit.train.checkpoint import (
    complete_checkpoints,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from vlmkit.train.loop import run_loop
from vlmkit.train.schedule import SCHEDULES, build_scheduler

log = get_logger(__name__)

OBJECTIVES: Registry[type[Objective]] = Registry("objective")
CHECKPOINTS = "checkpoints"  # OUT/checkpoints/step-N: an objective's checkpoints, removed once it is saved
DONE_FILE = "pretrain_config.yaml"  # the objective's config, written last: OUT holds a finished run
KEEP_LAST = 2


@dataclass
class ObjectiveConfig(KindConfig):
    """What every objective has: its data, its steps (a train/schedule.py `schedule` runs over `steps`: by
    default `cosine_floor`, warmup by progress from 1% of the lr over `warmup_ratio`, then cosine to 0;
    `max_seconds` > 0 also stops it after that much training time, before the lr reaches the end of its curve),
    checkpoints every `save_every` steps (0: none), a seed and the number of CPU threads (0: as set)."""

    _registry: ClassVar[str] = "vlmkit.train.objectives:OBJECTIVES"
    _key: ClassVar[str] = "objective"

    objective: str = "vision_pretrain"
    data: str | None = None
    image_root: str | None = None
    steps: int = 600
    schedule: str = "cosine_floor"
    max_seconds: float = 0.0
    lr: float = 4e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    save_every: int = 100
    seed: int = 0
    threads: int = 2
    log_every: int = 100


class Objective(ABC):
    """A loss over some modules and their data, one optimizer step at a time. The loop owns the steps, the
    schedule, the bar, the checkpoints and resume; the objective owns its batches and what a step does."""

    cfg: ObjectiveConfig
    model: nn.Module  # what trains: checkpoints hold its trainable parameters
    fields: Sequence[str] = ()  # the progress bar's numbers: formats over what `step` returns

    @abstractmethod
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over `model`'s parameter groups (base lr `cfg.lr`; the schedule scales it)."""

    @abstractmethod
    def step(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One optimizer step: a batch, the loss, backward, clipping, `optimizer.step()`; returns the numbers the
        bar shows (`fields`) and `describe` reads."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """What exact resume needs besides the weights, optimizer, scheduler and global RNGs (data position,
        the objective's own random generators, running averages)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self, step: int, seconds: float) -> str:
        """The log line every `cfg.log_every` steps."""
        return f"step {step} ({seconds:.0f}s)"

    def metrics(self, steps: int, seconds: float) -> dict[str, Any]:
        """What the run reports (and `save` writes) at its end."""
        return {"steps": steps, "seconds": round(seconds, 1)}

    @abstractmethod
    def save(self, out: Path, metrics: dict[str, Any]) -> None:
        """Write the trained result into `out`."""


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` (> 0) for a while."""
    previous = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_objective(
    objective: Objective,
    out: str | Path | None,
    *,
    resume: bool = False,
    progress: bool = True,
    name: str = "pretrain",
    kill: str = "pretrain_step",
) -> dict[str, Any]:
    """Train `objective` to its end on the shared loop; returns its metrics. With `out`: checkpoints in
    `out/checkpoints/` every `cfg.save_every` steps, `resume` continues from the newest one that verifies (else
    from the start), and at the end `objective.save(out)`, then `out/pretrain_config.yaml` (written last: the
    marker of a finished run), then the checkpoints are removed. Without `out`: in memory only."""
    cfg = objective.cfg
    if cfg.steps <= 0:
        raise ValueError(f"objective '{cfg.objective}': set steps (> 0) to bound the training")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(
            f"objective '{cfg.objective}': unknown schedule '{cfg.schedule}'; known: {', '.join(SCHEDULES)}"
        )
    root = Path(out) / CHECKPOINTS if out is not None else None
    optimizer = objective.optimizer()
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.steps, cfg.warmup_ratio)
    done, seconds_before = 0, 0.0
    if root is not None and resume:
        done, seconds_before = _resume(objective, root, optimizer, scheduler)
    elif root is not None and root.exists():
        shutil.rmtree(root)  # a new run: checkpoints of an earlier one are not ours to continue
    start = time.perf_counter()

    def seconds() -> float:
        return seconds_before + time.perf_counter() - start

    def one_step() -> dict[str, float]:
        numbers = objective.step(optimizer)
        scheduler.step()
        return numbers

    def report(step: int, numbers: dict[str, float]) -> None:
        if cfg.log_every and step % cfg.log_every == 0:
            log.info("%s", objective.describe(step, seconds()))

    def checkpoint(step: int) -> None:
        state = {
            "stage_index": -1,
            "stage_step": step,
            "epoch": 0,
            "batch_pos": 0,
            "objective": cfg.objective,
        }
        extra = {"objective": objective.state_dict(), "seconds": seconds()}
        assert root is not None
        save_checkpoint(root, step, objective.model, optimizer, scheduler, state, KEEP_LAST, extra=extra)

    objective.model.train()
    steps = run_loop(
        name,
        cfg.steps,
        done,
        one_step,
        fields=objective.fields,
        enabled=progress,
        after_step=report,
        checkpoint=checkpoint if root is not None else None,
        save_every=cfg.save_every,
        stop=(lambda: seconds() >= cfg.max_seconds) if cfg.max_seconds > 0 else None,
        kill=kill,
    )
    objective.model.eval()
    metrics = objective.metrics(steps, seconds())
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        objective.save(Path(out), metrics)
        save_yaml(cfg, Path(out) / DONE_FILE)
        shutil.rmtree(root, ignore_errors=True)  # type: ignore[arg-type]
    return metrics


def _resume(objective: Objective, root: Path, optimizer: Any, scheduler: Any) -> tuple[int, float]:
    """Load the newest checkpoint of `root` that verifies (each damaged newer one named in a warning) into the
    objective, optimizer, scheduler and RNGs; (its step, training seconds so far), or (0, 0) without one."""
    ckpt, problems = find_resume_checkpoint(root)
    for problem in problems:
        log.warning("--resume: skipping %s", problem)
    if ckpt is None:
        if complete_checkpoints(root) or problems:
            log.warning("--resume: no checkpoint in %s verifies; starting from the beginning", root)
        return 0, 0.0
    state, rest = load_checkpoint(ckpt, objective.model)
    optimizer.load_state_dict(rest["optimizer"])
    scheduler.load_state_dict(rest["scheduler"])
    set_rng_state(rest["rng"])
    objective.load_state_dict(rest["extra"]["objective"])
    log.info(
        "--resume: continuing the %s objective from %s (step %d)",
        objective.cfg.objective,
        ckpt,
        state["step"],
    )
    return int(state["step"]), float(rest["extra"].get("seconds", 0.0))
