"""Compare eval runs: a Markdown table (rows = runs, columns = metrics) and a PNG bar chart."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmkit.eval.runner import RESULTS_FILE


def load_result(path: str | Path) -> dict[str, Any]:
    """A run directory (its results.json) or a results.json file."""
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {RESULTS_FILE} in {path}")
    return json.loads(file.read_text(encoding="utf-8"))


def run_label(path: str | Path, result: dict[str, Any]) -> str:
    path = Path(path)
    name = path.name if path.is_dir() else path.parent.name or path.stem
    return name or str(result.get("benchmark", "run"))


def _is_count(name: str) -> bool:
    return name == "n" or name.startswith("n_") or name.endswith("_n") or name in ("judge_failed",)


def metric_columns(results: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None) -> list[str]:
    """`metrics` if given, else every numeric metric of the runs (first-seen order), counts left out."""
    if metrics:
        return list(metrics)
    columns: list[str] = []
    for result in results:
        for name, value in result.get("metrics", {}).items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if numeric and not _is_count(name) and name not in columns:
                columns.append(name)
    return columns


def _cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def markdown_table(
    results: Sequence[dict[str, Any]], labels: Sequence[str], metrics: Sequence[str] | None = None
) -> str:
    """Rows = runs (label, benchmark), columns = metrics; a run without a metric shows "–"."""
    columns = metric_columns(results, metrics)
    lines = [
        "| run | benchmark | " + " | ".join(columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for label, result in zip(labels, results):
        cells = [_cell(result.get("metrics", {}).get(c)) for c in columns]
        lines.append(f"| {label} | {result.get('benchmark', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(
    results: Sequence[dict[str, Any]],
    labels: Sequence[str],
    path: str | Path,
    metrics: Sequence[str] | None = None,
) -> Path:
    """Grouped bars (one group per metric, one bar per run) written as PNG with matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = metric_columns(results, metrics)
    fig = Figure(figsize=(max(6.0, 0.9 * len(columns) * max(1, len(results)) ** 0.5 + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(results))
    for k, (label, result) in enumerate(zip(labels, results)):
        values = [result.get("metrics", {}).get(c) for c in columns]
        heights = [v if isinstance(v, int | float) and math.isfinite(v) else 0.0 for v in values]
        ax.bar([i + k * width - 0.4 + width / 2 for i in range(len(columns))], heights, width, label=label)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("value")
    ax.set_title("eval runs")
    if results:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def render_report(
    paths: Sequence[str | Path], out_dir: str | Path, metrics: Sequence[str] | None = None
) -> tuple[str, Path]:
    """Load runs, write `out_dir/report.md` and `out_dir/report.png`; returns (markdown, png path)."""
    results = [load_result(p) for p in paths]
    labels = [run_label(p, r) for p, r in zip(paths, results)]
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):  # keep labels distinct
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} ({seen[label]})"
    table = markdown_table(results, labels, metrics)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(table, encoding="utf-8")
    png = bar_chart(results, labels, out / "report.png", metrics)
    return table, png
