"""Model subcommands: `vlmkit demo`, `export-hf`, `import-hf`, `info`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    pass
