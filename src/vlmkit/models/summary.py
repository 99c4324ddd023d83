"""Parameter accounting: per-part counts of trainable and frozen parameters, as rows or a rich table."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class PartCount:
    name: str
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    @property
    def status(self) -> str:
        if self.trainable and self.frozen:
            return "partly trainable"
        return "trainable" if self.trainable else "frozen"


def count_parts(model: nn.Module) -> list[PartCount]:
    """One row per top-level child module (vision, bridge, llm, fusion, ...)."""
    rows = []
    for name, child in model.named_children():
        params = list(child.parameters())
        if not params:
            continue
        trainable = sum(p.numel() for p in params if p.requires_grad)
        rows.append(PartCount(name, trainable, sum(p.numel() for p in params) - trainable))
    return rows


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def parts_table(model: nn.Module, title: str = "model parts"):
    """A rich Table of frozen/trainable parameter counts per part (plus a total row)."""
    from rich.table import Table

    rows = count_parts(model)
    table = Table(title=title)
    for col in ("part", "class", "status", "trainable", "frozen", "total"):
        table.add_column(col, justify="right" if col in ("trainable", "frozen", "total") else "left")
    for row in rows:
        cls = type(getattr(model, row.name)).__name__
        table.add_row(row.name, cls, row.status, _fmt(row.trainable), _fmt(row.frozen), _fmt(row.total))
    trainable = sum(r.trainable for r in rows)
    frozen = sum(r.frozen for r in rows)
    table.add_row("all", "", "", _fmt(trainable), _fmt(frozen), _fmt(trainable + frozen), style="bold")
    return table
