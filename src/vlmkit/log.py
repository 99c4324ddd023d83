"""Rank-aware logging: only rank 0 logs at INFO unless asked otherwise; no print() in library code."""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return get_rank() == 0 or record.levelno >= logging.WARNING


def get_logger(name: str) -> logging.Logger:
    """A logger under the `vlmkit` namespace; configure once with `setup_logging`."""
    return logging.getLogger(name if name.startswith("vlmkit") else f"vlmkit.{name}")


def setup_logging(level: int = logging.INFO) -> None:
    """Attach one handler to the `vlmkit` logger (called by the CLI, never at import)."""
    root = logging.getLogger("vlmkit")
    if any(getattr(h, "_vlmkit", False) for h in root.handlers):
        root.setLevel(level)
        return
    try:
        from rich.console import Console
        from rich.logging import RichHandler

        # logs go to stderr so that stdout carries only results (e.g. `--json` output)
        handler: logging.Handler = RichHandler(
            console=Console(stderr=True), show_path=False, rich_tracebacks=False
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    except ImportError:  # pragma: no cover - rich is a dependency
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
    handler._vlmkit = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter())
    root.addHandler(handler)
    root.setLevel(level)
