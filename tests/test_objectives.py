"""Objectives on the shared loop: the registry picks an objective's config by `objective`, a new objective is
one class + one registration, and a run cut short then resumed from its checkpoint equals an uninterrupted one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from vlmkit.config import ConfigError, from_dict
from vlmkit.train import pretrain_vision  # noqa: F401  (registers `vision_pretrain`)
from vlmkit.train.objectives import (
    CHECKPOINTS,
    DONE_FILE,
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    run_objective,
)
from vlmkit.train.schedule import lr_lambda


@dataclass
class LineConfig(ObjectiveConfig):
    slope: float = 3.0
    batch: int = 4
    stop_after: int = 0  # test hook: raise after this many steps (a crash mid-run)


class Crash(RuntimeError):
    pass


class Line(Objective):
    """Fits y = slope * x on random batches drawn from its own generator (state the resume must restore)."""

    fields = ("loss {task.fields[loss]:.4f}",)

    def __init__(self, cfg: LineConfig) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model = nn.Linear(1, 1)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.steps = 0
        self.lrs: list[float] = []

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr)

    def step(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        if self.cfg.stop_after and self.steps == self.cfg.stop_after:
            raise Crash
        self.lrs.append(optimizer.param_groups[0]["lr"])
        x = torch.randn(self.cfg.batch, 1, generator=self.gen)
        loss = (self.model(x) - self.cfg.slope * x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        self.steps += 1
        return {"loss": loss.item()}

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.steps = state["steps"]

    def save(self, out: Path, metrics: dict[str, Any]) -> None:
        torch.save(self.model.state_dict(), out / "line.pt")


@pytest.fixture
def line():
    OBJECTIVES.register("line", config=LineConfig)(Line)
    yield
    OBJECTIVES.unregister("line")


def test_the_objective_key_picks_the_registered_config(line):
    cfg = from_dict(ObjectiveConfig, {"objective": "line", "slope": 2.0, "steps": 5}, "pretrain_vision")
    assert isinstance(cfg, LineConfig) and cfg.slope == 2.0 and cfg.steps == 5
    default = from_dict(ObjectiveConfig, {"batch_size": 8}, "pretrain_vision")
    assert type(default).__name__ == "PretrainVisionConfig" and default.batch_size == 8
    with pytest.raises(ConfigError, match="slope"):  # a key the chosen objective lacks: its own keys listed
        from_dict(ObjectiveConfig, {"objective": "line", "batch_size": 8})
    with pytest.raises(ConfigError, match="known objectives: line, vision_pretrain"):
        from_dict(ObjectiveConfig, {"objective": "nope"})


def test_the_schedule_is_the_shared_one(line, tmp_path):
    cfg = LineConfig(objective="line", steps=20, lr=0.1, warmup_ratio=0.1, save_every=0, schedule="cosine")
    objective = OBJECTIVES.get("line")(cfg)
    start = objective.model.weight.item()
    metrics = run_objective(objective, tmp_path / "out", progress=False)
    assert metrics["steps"] == 20
    curve = lr_lambda("cosine", 20, 2)
    assert objective.lrs == pytest.approx([0.1 * curve(s) for s in range(20)], rel=1e-12)
    assert abs(objective.model.weight.item() - 3.0) < abs(start - 3.0) - 0.5  # it trains
    assert (tmp_path / "out" / "line.pt").is_file() and (tmp_path / "out" / DONE_FILE).is_file()


def test_the_default_schedule_starts_at_a_floor_even_in_a_short_run(line):
    """`cosine_floor` (the tower pretraining's curve): warmup by progress from 1% of the lr; `cosine` would give a
    3-step run no warmup step at all (its first step at the whole lr)."""
    objective = Line(LineConfig(objective="line", steps=3, lr=1.0, warmup_ratio=0.05, save_every=0))
    run_objective(objective, None, progress=False)
    assert objective.lrs[0] == pytest.approx(0.01)
    assert objective.lrs[1:] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * (p - 0.05) / 0.95)) for p in (1 / 3, 2 / 3)]
    )
    assert lr_lambda("cosine", 3, 0)(0) == 1.0


def test_a_crashed_objective_resumes_exactly(line, tmp_path):
    cfg = LineConfig(objective="line", steps=9, lr=0.05, save_every=3)
    run_objective(Line(cfg), tmp_path / "ref", progress=False)
    want = torch.load(tmp_path / "ref" / "line.pt")

    out = tmp_path / "run"
    with pytest.raises(Crash):  # dies in step 8, after the checkpoints of steps 3 and 6
        run_objective(Line(LineConfig(**{**vars(cfg), "stop_after": 7})), out, progress=False)
    assert sorted(p.name for p in (out / CHECKPOINTS).glob("step-*")) == ["step-3", "step-6"]
    assert not (out / DONE_FILE).exists()
    resumed = Line(cfg)
    metrics = run_objective(resumed, out, resume=True, progress=False)
    assert metrics["steps"] == 9 and resumed.steps == 9
    assert len(resumed.lrs) == 3  # only steps 7..9 ran again
    got = torch.load(out / "line.pt")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not (out / CHECKPOINTS).exists()  # removed once the result is saved

    fresh = Line(cfg)  # without resume a new run starts from the beginning
    run_objective(fresh, out, progress=False)
    assert len(fresh.lrs) == 9


def test_a_pretraining_config_written_before_objectives_still_counts_as_the_same(tmp_path):
    """Run directories of the previous version hold a pretrain_config.yaml without `objective` / `save_every`:
    the same settings, so `--resume` (and a rerun) keeps their tower instead of pretraining again."""
    from vlmkit.config import save_yaml, to_dict
    from vlmkit.train.pretrain_vision import PretrainVisionConfig
    from vlmkit.train.trainer import _same_config

    cfg = PretrainVisionConfig(steps=800, contrastive_weight=0.0, data="train.json")
    old = {k: v for k, v in to_dict(cfg).items() if k not in ("objective", "save_every")}
    save_yaml(old, tmp_path / DONE_FILE)
    assert _same_config(tmp_path / DONE_FILE, cfg)
    save_yaml({**old, "steps": 400}, tmp_path / DONE_FILE)
    assert not _same_config(tmp_path / DONE_FILE, cfg)
