"""Run metrics: `metrics.jsonl` (one object per optimizer step), optional TensorBoard, the loss/lr plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmkit.io import atomic_write_text
from vlmkit.log import get_logger

log = get_logger(__name__)


class MetricsLog:
    """Appends JSON lines; on resume, drops lines past the checkpoint's step so the file matches the run."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                log.warning(
                    "train.tensorboard is on but the tensorboard package is not installed; skipping it"
                )

    def truncate_after(self, step: int) -> None:
        """Keep the lines up to `step` (a resume point); lines cut by a kill are dropped. Atomic: a kill during
        the rewrite leaves the old file."""
        if not self.path.is_file():
            return
        keep = [line + "\n" for line, row in _lines(self.path) if row.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(keep))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.writer.add_scalar(f"{record.get('stage', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of each valid line; a line cut by a kill (not a JSON object) is skipped."""
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            out.append((line, row))
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a line cut by a kill is skipped)."""
    return [row for _, row in _lines(path)] if path.is_file() else []


def plot_run(metrics_path: Path, out_png: Path) -> Path | None:
    """Loss (train and validation) and learning rate against step, one PNG."""
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for stage in dict.fromkeys(r.get("stage", "") for r in train):
        pts = [r for r in train if r.get("stage", "") == stage]
        ax_loss.plot([r["step"] for r in pts], [r["loss"] for r in pts], label=f"train {stage}")
        ax_lr.plot([r["step"] for r in pts], [r["lr"] for r in pts], label=stage)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
