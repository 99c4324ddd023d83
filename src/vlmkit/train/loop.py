"""The one training loop: optimizer steps up to a total, the progress bar (or a log line every 5% without a
terminal), checkpoints every N steps, a kill point after each step. The Trainer's stages and the objectives
that train without the LLM (train/objectives.py: the tower's pretraining) both run on it; what a step does,
and what a checkpoint holds, is theirs."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace

from vlmkit.faults import kill_point
from vlmkit.log import get_logger
from vlmkit.progress import progress_bar

log = get_logger(__name__)

_FIELD = re.compile(r"task\.fields\[(\w+)\]")


def run_loop(
    name: str,
    total: int,
    done: int,
    step: Callable[[], dict[str, float]],
    *,
    fields: Sequence[str] = (),
    enabled: bool = True,
    after_step: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint: Callable[[int], None] | None = None,
    save_every: int = 0,
    stop: Callable[[], bool] | None = None,
    kill: str = "step_done",
) -> int:
    """Run optimizer steps `done + 1 .. total`; returns the number of steps done (fewer when `stop()` says so).

    `step()` makes one optimizer step and returns the numbers the bar's `fields` show (format strings over
    `task.fields[...]`, e.g. "loss {task.fields[loss]:.4f}"). After each step: the bar (or, when stderr is no
    terminal, a log line every 5% of the steps), `after_step(steps_done, numbers)` (metrics, validation),
    `checkpoint(steps_done)` every `save_every` steps (not after the last one: the caller saves its result),
    then the kill point `kill` (`VLMKIT_KILL_AT`, for the resume tests). `stop()` is asked before each step."""
    keys = [k for text in fields for k in _FIELD.findall(text)]
    bar = progress_bar(*fields, enabled=enabled)
    task = bar.add_task(name, total=total, completed=done, **{k: math.nan for k in keys})
    start, first = time.perf_counter(), done
    with bar:
        while done < total and not (stop is not None and stop()):
            numbers = step()
            done += 1
            bar.update(task, advance=1, **numbers)
            if enabled and not bar.console.is_terminal and (done % max(1, total // 20) == 0 or done == total):
                elapsed = time.perf_counter() - start  # no live bar (CI, nohup): a log line every 5% instead
                eta = elapsed / max(done - first, 1) * (total - done)
                shown = SimpleNamespace(fields=numbers)
                log.info(
                    "%s step %d/%d  %s  ETA %.0f s",
                    name, done, total, "  ".join(text.format(task=shown) for text in fields), eta,
                )  # fmt: skip
            if after_step is not None:
                after_step(done, numbers)
            if checkpoint is not None and save_every and done % save_every == 0 and done < total:
                checkpoint(done)
            kill_point(kill)
    return done
