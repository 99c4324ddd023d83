"""Atomic, verified checkpoints and exact resume: trainable weights, optimizer, scheduler, RNG, trainer state."""

from __future__ import annotations

import errno
import hashlib
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
from vlmkit.io import fsync_dir
from vlmkit.log import get_logger

log = get_logger(__name__)

WEIGHTS_NAME = "trainable.safetensors"
OPTIM_NAME = "optim.pt"
STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"  # written last inside the temp dir: sizes and sha256 of every other file
FILES = (WEIGHTS_NAME, OPTIM_NAME, STATE_NAME)
STATE_KEYS = ("stage_index", "stage_step", "step", "epoch", "batch_pos")
LATEST = "latest"


class NoSpaceError(OSError):
    """The filesystem filled up while a checkpoint was written (the previous checkpoints are untouched)."""


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested dict/list (what a checkpoint of it needs on disk, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _size(n: float) -> str:
    units = ["bytes", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} bytes" if i == 0 else f"{n:.1f} {units[i]}"


def _is_no_space(err: BaseException) -> bool:
    """A full disk as the writers report it: OSError ENOSPC/EDQUOT, safetensors' 'os error 28', or torch's zip
    writer ('enforce fail at inline_container.cc ... unexpected pos', 'file write failed')."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(
        s in text for s in ("No space left on device", "os error 28", "unexpected pos", "file write failed")
    )


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
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `ckpt_root/step-N` via a temp dir + rename, then move the `latest` pointer; keep the last K.

    The temp dir gets the weights, the optimizer/scheduler/RNG state, the trainer state and last a manifest
    (size and sha256 of each file) that `verify_checkpoint` checks on resume. `extra`: more state exact resume
    needs (an objective's data position and samplers), saved with the optimizer's as `"extra"`. A full disk raises `NoSpaceError`
    naming the path and the bytes needed; the temp dir is removed and the previous checkpoints stay as they were.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    weights = weights if weights is not None else trainable_state(model)
    rest = {
        "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }
    if extra is not None:
        rest["extra"] = extra
    try:
        tmp.mkdir()
        save_file(weights, str(tmp / WEIGHTS_NAME))
        kill_point("checkpoint_write")
        torch.save(rest, tmp / OPTIM_NAME)
        (tmp / STATE_NAME).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        manifest = {
            "step": step,
            "files": {
                name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
                for name in FILES
            },
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        fsync_dir(tmp)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _is_no_space(err):
            raise
        needed = _tensor_bytes(weights) + _tensor_bytes(rest)
        free = shutil.disk_usage(ckpt_root).free
        kept = latest_checkpoint(ckpt_root)
        raise NoSpaceError(
            errno.ENOSPC,
            f"no space left on device while writing checkpoint {final}: it needs about {needed:,} bytes "
            f"({_size(needed)}), {free:,} bytes ({_size(free)}) are free there; "
            + (f"the previous checkpoint {kept} is kept" if kept else "no earlier checkpoint exists")
            + f" (writer: {err})",
        ) from err
    old = ckpt_root / f".step-{step}.old-{os.getpid()}"
    if final.exists():  # the same step written again (a resumed run): swapped out, then removed
        os.replace(final, old)
    os.replace(tmp, final)
    kill_point("checkpoint_commit")
    pointer_tmp = ckpt_root / f".{LATEST}.tmp-{os.getpid()}"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, ckpt_root / LATEST)
    fsync_dir(ckpt_root)
    shutil.rmtree(old, ignore_errors=True)
    _prune(ckpt_root, keep_last)
    return final


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _is_complete(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file() or (path / STATE_NAME).is_file()


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """`step-N` dirs that were committed (renamed from their temp dir), oldest first; not verified."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob("step-*") if p.is_dir() and _step_of(p) >= 0 and _is_complete(p)]
    return sorted(found, key=_step_of)


def _prune(ckpt_root: Path, keep_last: int) -> None:
    for stale in [*ckpt_root.glob(".step-*.tmp-*"), *ckpt_root.glob(".step-*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last > 0:
        for old in complete_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint named by `latest` if committed, else the newest committed one; None when there is none.
    Cheap (no checksums): `find_resume_checkpoint` verifies."""
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        candidate = ckpt_root / pointer.read_text().strip()
        if candidate.name.startswith("step-") and _is_complete(candidate):
            return candidate
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def verify_checkpoint(path: Path) -> str | None:
    """None if `path` is a complete, undamaged checkpoint; else what is wrong with it (one line)."""
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        missing = [name for name in FILES if not (path / name).is_file()]
        if missing:
            return f"{MANIFEST_NAME} and {', '.join(missing)} are missing"
        log.warning(
            "%s has no %s (written by an older vlmkit): its files are not verified", path, MANIFEST_NAME
        )
        return _check_state(path)
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST_NAME} is unreadable ({type(err).__name__}: {err})"
    for name in FILES:
        entry = files.get(name) if isinstance(files, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int):
            return f"{MANIFEST_NAME} does not list {name} with its size"
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{name} is {size:,} bytes, the manifest says {entry['bytes']:,} (truncated or rewritten)"
        if file_sha256(file) != entry.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return _check_state(path)


def _check_state(path: Path) -> str | None:
    try:
        state = json.loads((path / STATE_NAME).read_text())
    except (OSError, ValueError) as err:
        return f"{STATE_NAME} is unreadable ({type(err).__name__}: {err})"
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    return f"{STATE_NAME} lacks {', '.join(missing)}" if missing else None


def find_resume_checkpoint(ckpt_root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and one line for each newer one that did not (what was wrong)."""
    problems = []
    candidates = (
        [p for p in ckpt_root.glob("step-*") if p.is_dir() and _step_of(p) >= 0] if ckpt_root.is_dir() else []
    )
    for path in sorted(candidates, key=_step_of, reverse=True):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, problems
        problems.append(f"checkpoint {path}: {problem}")
    return None, problems


def read_state(path: Path) -> dict[str, Any]:
    """The trainer state (stage, step, data position) of a complete checkpoint."""
    return json.loads((path / STATE_NAME).read_text())


def load_checkpoint(path: Path, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load trainable weights into `model`; return (trainer_state, {optimizer, scheduler, rng[, extra]})."""
    weights = load_file(str(path / WEIGHTS_NAME))
    params = dict(model.named_parameters())
    unknown = [k for k in weights if k not in params]
    if unknown:
        raise RuntimeError(f"checkpoint {path} holds weights the model does not have: {unknown[:5]}")
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks trainable weights of this stage: {missing[:5]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    state = read_state(path)
    rest = torch.load(path / OPTIM_NAME, weights_only=False)
    return state, rest
