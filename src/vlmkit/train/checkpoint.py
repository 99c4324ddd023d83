"""Atomic checkpoints and exact resume: trainable weights, optimizer, scheduler, RNG, sampler, trainer state."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlmkit.faults import kill_point
from vlmkit.log import get_logger

log = get_logger(__name__)

STATE_NAME = (
    "trainer_state.json"  # written last inside the temp dir: its presence marks a complete checkpoint
)
LATEST = "latest"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint must hold: every parameter that trains in this stage."""
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep_last: int = 2,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write `ckpt_root/step-N` via a temp dir + rename, then move the `latest` pointer; keep the last K."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights if weights is not None else trainable_state(model), str(tmp / "trainable.safetensors"))
    kill_point("checkpoint_write")
    torch.save(
        {
            "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        },
        tmp / "optim.pt",
    )
    (tmp / STATE_NAME).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    kill_point("checkpoint_commit")
    pointer_tmp = ckpt_root / f".{LATEST}.tmp-{os.getpid()}"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, ckpt_root / LATEST)
    _fsync_dir(ckpt_root)
    _prune(ckpt_root, keep_last)
    return final


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete `step-N` dirs, oldest first (temp dirs and half-written ones are ignored)."""
    if not ckpt_root.is_dir():
        return []
    found = [
        p for p in ckpt_root.glob("step-*") if p.is_dir() and (p / STATE_NAME).is_file() and _step_of(p) >= 0
    ]
    return sorted(found, key=_step_of)


def _prune(ckpt_root: Path, keep_last: int) -> None:
    for stale in ckpt_root.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last > 0:
        for old in complete_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint named by `latest` if complete, else the newest complete one; None when there is none."""
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        candidate = ckpt_root / pointer.read_text().strip()
        if (candidate / STATE_NAME).is_file():
            return candidate
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def read_state(path: Path) -> dict[str, Any]:
    """The trainer state (stage, step, data position) of a complete checkpoint."""
    return json.loads((path / STATE_NAME).read_text())


def load_checkpoint(path: Path, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load trainable weights into `model`; return (trainer_state, {optimizer, scheduler, rng})."""
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = [k for k in weights if k not in params]
    if unknown:
        raise RuntimeError(f"checkpoint {path} holds weights the model does not have: {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    state = read_state(path)
    rest = torch.load(path / "optim.pt", weights_only=False)
    return state, rest
