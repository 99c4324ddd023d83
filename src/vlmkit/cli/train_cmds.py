"""`vlmkit train`: run a recipe's stages into a run directory (resumable)."""

from __future__ import annotations

import argparse


def _train(args: argparse.Namespace) -> int:
    from vlmkit.config import ConfigError, RecipeConfig, load_config
    from vlmkit.data.formats import DataError
    from vlmkit.train.checkpoint import NoSpaceError
    from vlmkit.train.stages import QuantizationUnavailableError
    from vlmkit.train.trainer import RunDirError, train

    try:
        recipe = load_config(RecipeConfig, args.config, args.set)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        final = train(recipe, args.out, resume=args.resume)
    except (RunDirError, NoSpaceError, DataError, QuantizationUnavailableError, ConfigError) as err:
        raise SystemExit(f"error: {err}") from None  # what the user can fix: a message, not a traceback
    from vlmkit.train.strategies import rank

    if rank() == 0:
        print(f"trained model: {final}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a recipe's stages (align, instruct, ...) into a run directory"
    )
    p.add_argument("config", help="recipe YAML (see configs/)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument(
        "--resume", action="store_true", help="continue from the run directory's latest checkpoint"
    )
    p.set_defaults(func=_train)
