"""`vlmkit eval`: run a model on a benchmark, score saved predictions, compare runs in a report."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

_USAGE = """
  vlmkit eval MODEL_DIR --benchmark NAME --data PATH [--images DIR] [--out DIR] [--json] [options]
  vlmkit eval score --benchmark NAME --data PATH --predictions FILE [--out DIR] [--json] [options]
  vlmkit eval report RUN_OR_RESULT [RUN_OR_RESULT ...] [--out DIR] [--metrics NAME ...]"""

_DESCRIPTION = (
    "Evaluate on benchmarks read from local files in their standard formats (nothing is downloaded). "
    "Benchmarks: pope, mme, vqav2, multiple-choice (mmbench, scienceqa), grounding (refcoco), captioning "
    "(coco-captions), judge (mmvet), shapesworld. A run appends to OUT/predictions.jsonl as it goes and "
    "skips answered question_ids when rerun with the same --out; OUT/results.json holds metrics and "
    "provenance."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on a benchmark, re-score predictions, or report across runs",
        description=_DESCRIPTION,
        usage=_USAGE,
    )
    p.add_argument("target", metavar="MODEL_DIR|score|report", help="a saved model directory, or a command")
    p.add_argument("runs", nargs="*", metavar="RUN_OR_RESULT", help="report: run directories or results.json")
    p.add_argument("--json", action="store_true", help="print only one JSON object of metrics")

    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", help="benchmark id (see above)")
    g.add_argument("--data", help="the benchmark's question file (or directory) in its standard format")
    g.add_argument("--images", default=None, help="image directory (default: the data file's directory)")
    g.add_argument("--annotations", default=None, help="vqav2: the official annotations JSON")
    g.add_argument("--prompt-suffix", default=None, help="replace the benchmark's instruction suffix")
    g.add_argument("--grounding-format", default=None, choices=("qwen", "kosmos", "shikra", "pixel"))
    g.add_argument(
        "--lenient",
        action="store_true",
        help='pope: read answers lowercased ("NO" -> no) instead of by the official case-sensitive rule; '
        "recorded in the results, not comparable with published numbers",
    )

    g = p.add_argument_group("run (MODEL_DIR)")
    g.add_argument("--out", default=None, help="output dir (default runs/eval/<benchmark>-<timestamp>)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark's own")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--template", default=None, help="chat template (default: the model's saved one)")
    g.add_argument("--system-prompt", default=None)
    g.add_argument("--resize", default=None, help="resize | pad | crop | anyres (default: the model's)")
    g.add_argument("--overwrite", action="store_true", help="discard earlier predictions in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = p.add_argument_group("multiple choice")
    g.add_argument("--mc-mode", default=None, choices=("generate", "constrained", "likelihood"))
    g.add_argument("--mc-target", default=None, choices=("letter", "text"), help="what the model writes")
    g.add_argument("--mc-reduce", default=None, choices=("sum", "mean"), help="likelihood: option score")

    g = p.add_argument_group("LLM judge (judge / mmvet)")
    g.add_argument(
        "--judge-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1"
    )
    g.add_argument("--judge-model", default=None)
    g.add_argument("--judge-temperature", type=float, default=0.0)
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="env var holding the API key")
    g.add_argument("--judge-cache", default=None, help="JSONL judgment cache (default: next to the results)")
    g.add_argument("--judge-retries", type=int, default=4)

    g = p.add_argument_group("score")
    g.add_argument("--predictions", default=None, help='JSONL {"question_id", "answer"} (or a JSON list)')

    g = p.add_argument_group("report")
    g.add_argument("--metrics", nargs="*", default=None, help="columns to show (default: all)")
    p.set_defaults(func=_cmd_eval, _parser=p)


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.target == "report":
        return _cmd_report(args)
    if args.runs:
        args._parser.error(f"unexpected arguments {args.runs} (only `report` takes several paths)")
    if not args.benchmark or not args.data:
        args._parser.error("--benchmark and --data are required")
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        results = _cmd_score(args) if args.target == "score" else _cmd_run(args)
    _show(results, args.json)
    return 0


def _judge(args: argparse.Namespace, out: Path | None) -> Any:
    if not args.judge_url:
        return None
    if not args.judge_model:
        raise SystemExit("error: --judge-url needs --judge-model")
    from vlmkit.eval.judge import Judge

    cache = args.judge_cache or (out / "judge_cache.jsonl" if out is not None else None)
    return Judge(
        args.judge_url,
        args.judge_model,
        temperature=args.judge_temperature,
        api_key_env=args.judge_api_key_env,
        cache_path=cache,
        retries=args.judge_retries,
    )


def _benchmark(args: argparse.Namespace, out: Path | None) -> Any:
    from vlmkit.eval.benchmarks import build_benchmark

    if args.lenient and args.benchmark != "pope":
        raise SystemExit(f"error: --lenient is a POPE answer rule; benchmark '{args.benchmark}' has none")
    try:
        return build_benchmark(
            args.benchmark,
            args.data,
            args.images,
            annotations=args.annotations,
            prompt_suffix=args.prompt_suffix,
            grounding_format=args.grounding_format,
            mode=args.mc_mode,
            target=args.mc_target,
            reduce=args.mc_reduce,
            judge=_judge(args, out),
            lenient=args.lenient or None,
        )
    except (KeyError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def _cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from vlmkit.eval.runner import run_eval
    from vlmkit.infer.generate import Predictor
    from vlmkit.models.generation import GenerationConfig
    from vlmkit.models.vlm import VisionLanguageModel

    model_dir = Path(args.target)
    if not model_dir.is_dir():
        raise SystemExit(f"error: no such model directory: {model_dir}")
    out = Path(args.out or f"runs/eval/{args.benchmark}-{time.strftime('%Y%m%d-%H%M%S')}")
    bench = _benchmark(args, out)
    model = VisionLanguageModel.from_pretrained(model_dir)
    predictor = Predictor(
        model,
        template=args.template,
        resize=args.resize,
        system_prompt=args.system_prompt,
        grounding_format=args.grounding_format,
    )
    generation = dataclasses.replace(
        GenerationConfig(),
        max_new_tokens=args.max_new_tokens or bench.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_p=args.top_p,
        seed=args.seed,
    )
    try:
        return run_eval(
            predictor,
            bench,
            out,
            batch_size=args.batch_size,
            generation=generation,
            seed=args.seed,
            model_path=model_dir,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except RuntimeError as err:
        raise SystemExit(f"error: {err}") from None


def _cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    from vlmkit.eval.runner import score_predictions

    if not args.predictions or not Path(args.predictions).is_file():
        raise SystemExit("error: `vlmkit eval score` needs --predictions FILE")
    out = Path(args.out) if args.out else None
    bench = _benchmark(args, out if out is not None else Path(args.predictions).parent)
    try:
        return score_predictions(bench, args.predictions, out)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def _show(results: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results["metrics"]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['benchmark']} ({results['num_items']} items)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in results["metrics"].items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    for key, note in results.get("info", {}).items():
        console.print(f"{key}: {note}")
    if results.get("num_missing"):
        console.print(f"[yellow]{results['num_missing']} items had no prediction (scored as empty answers)")
    if results.get("predictions"):
        console.print(f"predictions: {results['predictions']}")


def _cmd_report(args: argparse.Namespace) -> int:
    from vlmkit.eval.report import render_report

    if not args.runs:
        args._parser.error("report needs at least one run directory or results.json")
    out = Path(args.out or f"runs/eval/report-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        table, png = render_report(args.runs, out, args.metrics)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    print(table)
    print(f"wrote {out / 'report.md'} and {png}")
    return 0
