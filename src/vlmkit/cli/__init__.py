"""`vlmkit` command line: parses arguments and calls library functions (one module per area)."""

from __future__ import annotations

import argparse
import importlib
import sys

from vlmkit import __version__
from vlmkit.log import setup_logging

# Each module defines `register(subparsers)`, adding its subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = [
    "vlmkit.cli.model_cmds",
    "vlmkit.cli.data_cmds",
    "vlmkit.cli.serve_cmds",
    "vlmkit.cli.train_cmds",
    "vlmkit.cli.pretrain_cmds",
    "vlmkit.cli.eval_cmds",
    "vlmkit.cli.quickstart_cmds",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vlmkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
