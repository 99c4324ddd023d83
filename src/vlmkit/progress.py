"""The project's one progress bar (rich, on stderr): a description, the bar, done/total, the caller's numbers,
elapsed time and the time left. Training, tower pretraining and evaluation all show progress through it."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(*fields: str, enabled: bool = True, count: bool = True) -> Progress:
    """A `rich` Progress; `fields` are format strings over each task's fields (e.g. "loss {task.fields[loss]:.4f}",
    set with `add_task(..., loss=...)` / `update(...)`); `count`: show done/total and the time left. Disabled
    (nothing drawn) on ranks other than the main one or when the caller asks."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn()]
    if count:
        columns.append(MofNCompleteColumn())
    columns += [TextColumn(text) for text in fields]
    columns.append(TimeElapsedColumn())
    if count:
        columns += [TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False)
