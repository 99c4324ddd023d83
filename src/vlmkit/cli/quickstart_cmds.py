"""`vlmkit quickstart`: the end-to-end demo on the embedded default model."""

from __future__ import annotations

import argparse
from pathlib import Path


def _quickstart(args: argparse.Namespace) -> int:
    from vlmkit.shapesworld.quickstart import print_report, run_quickstart

    results = run_quickstart(args.out, tiny=args.tiny, overrides=args.set, resume=args.resume)
    print_report(results, Path(args.out))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quickstart", help="teach the embedded SmolLM2 to see ShapesWorld, then evaluate it"
    )
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--tiny", action="store_true", help="tiny random LLM: the whole path in seconds")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides of the recipe")
    p.add_argument("--resume", action="store_true", help="continue an interrupted quickstart in --out")
    p.set_defaults(func=_quickstart)
