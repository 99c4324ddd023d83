"""`vlmkit data ...` subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmkit.config import DataConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="generate, check and inspect datasets")
    data.set_defaults(func=lambda args: data.print_help() or 2)
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    _register_synth(sub)
    _register_check(sub)
    _register_shard(sub)


# ---------------------------------------------------------------------------------------- data synth
def _parse_splits(text: str) -> dict[str, int]:
    """Parse `train=800,val=100,test=100` into {"train": 800, "val": 100, "test": 100}."""
    splits: dict[str, int] = {}
    for part in text.split(","):
        name, sep, count = part.strip().partition("=")
        if not sep or not name or not count.strip().isdigit():
            raise argparse.ArgumentTypeError(f"bad split {part!r}; expected NAME=COUNT[,NAME=COUNT...]")
        splits[name.strip()] = int(count)
    return splits


def _parse_tasks(text: str) -> list[str]:
    from vlmkit.shapesworld.world import ALL_TASKS

    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown}; choose from {','.join(ALL_TASKS)}")
    return tasks


def _register_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="generate the ShapesWorld synthetic dataset (PNGs + LLaVA JSON)",
        description="Generate ShapesWorld: colored shapes with caption, QA, counting, spatial, POPE, "
        "grounding and region records. Same arguments give byte-identical output.",
    )
    p.add_argument("out", help="output directory (images/ and SPLIT.json are written there)")
    p.add_argument("--n", type=int, default=1000, help="number of scenes when --splits is not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--splits",
        type=_parse_splits,
        default=None,
        help="scenes per split, e.g. train=800,val=100,test=100 (overrides --n)",
    )
    p.add_argument("--tasks", type=_parse_tasks, default=None, help="comma-separated subset (default: all)")
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--noise", action="store_true", help="noisy background and gray distractors")
    p.add_argument(
        "--describe-first",
        type=_parse_tasks,
        default=[],
        help="tasks (counting,pope,spatial) whose answers first list the objects, then answer",
    )
    p.add_argument(
        "--train-pope-binding",
        type=float,
        default=0.0,
        help="share (0..1) of the train split's POPE negatives drawn as binding negatives (colour and shape "
        "both in the scene, on different objects); val/test unchanged",
    )
    p.add_argument(
        "--grounding-format",
        default="qwen",
        choices=("qwen", "kosmos", "shikra", "pixel"),
        help="box format for grounding/region records",
    )
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from vlmkit.shapesworld.world import ALL_TASKS, generate_shapesworld

    paths = generate_shapesworld(
        args.out,
        n_scenes=args.n,
        seed=args.seed,
        image_size=args.image_size,
        tasks=args.tasks or ALL_TASKS,
        max_objects=args.max_objects,
        noise=args.noise,
        grounding_format=args.grounding_format,
        splits=args.splits,
        describe_first=args.describe_first,
        train_pope_binding=args.train_pope_binding,
    )
    for split, path in paths.items():
        records = json.loads(path.read_text())
        n_images = len({r["image"] for r in records})
        print(f"{split}: {path} ({n_images} images, {len(records)} records)")
    return 0


# ---------------------------------------------------------------------------------------- data check
def _register_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="validate a data file: parse records, open images, count placeholders, report skip reasons",
        description="Validate FILE without training. Without --model no model or tokenizer is loaded "
        "(lengths are estimated); with --model DIR the exact training encoding is checked. Exits 1 when "
        "the rejected fraction exceeds --max-bad.",
    )
    p.add_argument("file", help="LLaVA JSON/JSONL, caption JSONL, `messages` JSONL or Qwen-VL JSON")
    p.add_argument(
        "--image-root", default=None, help="directory image paths are relative to (default: FILE's)"
    )
    p.add_argument("--format", default="auto", help="auto | llava | captions | messages | qwen")
    p.add_argument("--json", action="store_true", help='print only {"total", "ok", "rejected"} as JSON')
    p.add_argument(
        "--max-bad", type=float, default=0.05, help="largest acceptable rejected/total (default 0.05)"
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="flag samples whose first round is longer than this many tokens (estimated without --model); "
        f"default: a recipe's default data.max_length ({DataConfig().max_length}); 0: no length check",
    )
    p.add_argument(
        "--tokens-per-image", type=int, default=0, help="visual tokens per image for the length estimate"
    )
    p.add_argument("--max-pixels", type=int, default=None, help="largest image, width * height (default 64M)")
    p.add_argument("--max-bytes", type=int, default=None, help="largest image file in bytes (default 32 MiB)")
    p.add_argument(
        "--model", default=None, help="a saved vlmkit model dir: check the exact training encoding"
    )
    p.add_argument("--workers", type=int, default=0, help="threads for image decoding")
    p.set_defaults(func=_cmd_check)


def _processor(model_dir: str):
    """A saved model's processor (its tokenizer and settings; no weights are loaded)."""
    from vlmkit.data.processor import PROCESSOR_NAME, Processor

    if (Path(model_dir) / PROCESSOR_NAME).is_file():
        return Processor.from_pretrained(model_dir)
    import torch
    from transformers import AutoTokenizer

    from vlmkit.config import ModelConfig, from_dict
    from vlmkit.models.vlm import CONFIG_NAME, VisionLanguageModel

    # saved by a vlmkit before the Processor: the model's config built on the meta device (no weights read)
    path = Path(model_dir)
    if not (path / CONFIG_NAME).is_file():
        raise SystemExit(f"error: {model_dir} has no {CONFIG_NAME}: not a vlmkit model directory")
    cfg = from_dict(ModelConfig, json.loads((path / CONFIG_NAME).read_text())["model"])
    try:
        with torch.device("meta"):
            return VisionLanguageModel.from_config(cfg, AutoTokenizer.from_pretrained(path)).processor
    except (RuntimeError, NotImplementedError):  # a part that computes from its weights when it is built
        return VisionLanguageModel.from_pretrained(path).processor


def _cmd_check(args: argparse.Namespace) -> int:
    import contextlib
    import sys

    from vlmkit.data.dataset import DataError, check_data

    if not Path(args.file).is_file():
        raise SystemExit(f"error: no such data file: {args.file}")
    # With --json, stdout carries the JSON object alone: anything logged meanwhile goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        processor = _processor(args.model) if args.model else None
        try:
            report = check_data(
                args.file,
                args.image_root,
                fmt=args.format,
                max_length=args.max_length,
                tokens_per_image=args.tokens_per_image,
                max_pixels=args.max_pixels,
                max_bytes=args.max_bytes,
                processor=processor,
                num_workers=args.workers,
            )
        except DataError as err:
            raise SystemExit(f"error: {err}") from None
    too_bad = report.bad_fraction > args.max_bad
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        from rich.console import Console

        console = Console()
        console.print(report.table())
        console.print(
            f"rejected {report.num_rejected}/{report.total} = {report.bad_fraction:.1%} "
            f"(max-bad {args.max_bad:.1%}): {'FAIL' if too_bad else 'ok'}"
        )
    return 1 if too_bad else 0


# ---------------------------------------------------------------------------------------- data shard
def _register_shard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shard",
        help="write a data file's records into WebDataset tar or Parquet shards, images embedded",
        description="Write FILE's records into shards of --shard-size records with each image's bytes "
        "embedded, plus OUT/shards.json (paths and record counts). Name OUT (or a glob of its shards) in "
        "data.train to stream them while training. Records whose images cannot be read are left out and "
        "reported; images are copied as they are (bad ones are skipped and counted when training reads them).",
    )
    p.add_argument("file", help="LLaVA JSON/JSONL, caption JSONL, `messages` JSONL or Qwen-VL JSON")
    p.add_argument("--out", required=True, help="output directory (must not hold shards yet)")
    p.add_argument(
        "--image-root", default=None, help="directory image paths are relative to (default: FILE's)"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="records per shard (default 1000)")
    p.add_argument(
        "--format", default="wds", choices=("wds", "parquet"), help="WebDataset .tar (default) or .parquet"
    )
    p.set_defaults(func=_cmd_shard)


def _cmd_shard(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlmkit.data.sources.writer import write_shards

    if not Path(args.file).is_file():
        raise SystemExit(f"error: no such data file: {args.file}")
    try:
        shards, report = write_shards(
            args.file, args.out, image_root=args.image_root, shard_size=args.shard_size, kind=args.format
        )
    except (FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    for shard in shards:
        print(f"{shard.path}: {shard.count} records")
    print(f"{report.summary()}; index: {Path(args.out) / 'shards.json'}")
    return 0
