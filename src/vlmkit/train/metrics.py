"""Run metrics: `metrics.jsonl` (one object per optimizer step), optional TensorBoard, the loss/lr plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmkit.io import atomic_write_text
from vlmkit.log import get_logger

log = get_logger(__name__)


class MetricsLog:
    """Appends JSON lines (and TensorBoard scalars); on resume, drops what lies past the checkpoint's step so both
    match the run."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.tensorboard_dir = tensorboard_dir
        self.writer: Any = None
        self._purge_step: int | None = None  # TensorBoard hides earlier runs' events from this step on

    def truncate_after(self, step: int) -> None:
        """Keep the lines up to `step` (a resume point); lines cut by a kill are dropped. Atomic: a kill during
        the rewrite leaves the old file. TensorBoard's events past `step` are purged when its writer starts."""
        self._purge_step = step + 1
        if not self.path.is_file():
            return
        keep = [line + "\n" for line, row in _lines(self.path) if row.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(keep))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._writer()
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    writer.add_scalar(f"{record.get('stage', 'train')}/{key}", value, record["step"])

    def _writer(self) -> Any:
        """TensorBoard's writer, started at the first record (after a resume's `truncate_after`)."""
        if self.writer is None and self.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
            except ImportError:
                log.warning(
                    "train.tensorboard is on but the tensorboard package is not installed; skipping it"
                )
                self.tensorboard_dir = None
        return self.writer

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
    """Loss (train and validation), learning rate and, when images were seen, the visual tokens' scale against
    step, one PNG. The visual-token panel shows their RMS over the word embeddings' (each step) and the cosine
    of their hidden state after the last layer with their input (each validation): far above 1 and near 1
    mean the LLM carries them through its layers untransformed."""
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    visual = [r for r in rows if "visual_rms_ratio" in r]
    panels = 3 if visual else 2
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3 * panels), sharex=True)
    ax_loss, ax_lr = axes[0], axes[1]
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
    if visual:
        ax_vis = axes[2]
        ax_vis.plot([r["step"] for r in visual], [r["visual_rms_ratio"] for r in visual], color="#4c78a8")
        ax_vis.axhline(1.0, color="#4c78a8", linestyle=":", linewidth=1)
        ax_vis.set_yscale("log")
        ax_vis.set_ylabel("visual RMS / word RMS", color="#4c78a8")
        cos = [r for r in rows if r.get("val_visual_cos")]
        if cos:
            twin = ax_vis.twinx()
            steps = [r["step"] for r in cos]
            twin.plot(steps, [r["val_visual_cos"][-1] for r in cos], "o-", color="#e45756", label="visual")
            twin.plot(steps, [r["val_text_cos"][-1] for r in cos], "s--", color="#72b7b2", label="text")
            twin.set_ylim(-0.1, 1.05)
            twin.set_ylabel("cos(last layer, input)", color="#e45756")
            twin.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_learning_curves(
    metrics_path: Path, out_png: Path, targets: dict[str, float] | None = None
) -> Path | None:
    """Task accuracy against optimizer step from the generation hook's `gen_*` metrics (`train.eval_generation`),
    one line per metric, targets dashed; None when the run logged none."""
    rows = [r for r in read_metrics(metrics_path) if any(k.startswith("gen_") for k in r)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith("gen_")]
    names = [k for k in names if not k.startswith(("gen_pope_precision", "gen_pope_recall"))]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        pts = [r for r in rows if isinstance(r.get(name), int | float)]
        line = ax.plot([r["step"] for r in pts], [r[name] for r in pts], "o-", label=name[4:])[0]
        target = (targets or {}).get(name[4:])
        if target is not None:
            ax.axhline(target, color=line.get_color(), linestyle="--", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation score (generated answers)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    ax.set_title("learning curves (dashed: targets)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
