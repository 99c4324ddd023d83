"""Model subcommands: `vlmkit info`, `export-hf`, `import-hf`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _export(args: argparse.Namespace) -> int:
    from vlmkit.models.hf_export import ExportError, export_hf, export_plan
    from vlmkit.models.vlm import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(args.model_dir)
    try:
        plan = export_plan(model)
        out = export_hf(model, args.out_dir)
    except ExportError as err:
        raise SystemExit(f"error: {err}") from None
    print(
        f"wrote {out} (transformers {plan.architecture} + processor with the training preprocessing and chat "
        f"template; vLLM: python -m vllm.entrypoints.openai.api_server --model {out})"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from vlmkit.models.hf_export import ExportError, import_hf

    try:
        model = import_hf(args.hf_dir)
    except ExportError as err:
        raise SystemExit(f"error: {err}") from None
    out = model.save_pretrained(args.out_dir)
    print(f"wrote {out} (vlmkit model)")
    return 0


def _info(args: argparse.Namespace) -> int:
    from rich.console import Console

    from vlmkit.config import ModelConfig, RecipeConfig, load_config
    from vlmkit.data.images import gpt4v_image_tokens
    from vlmkit.models.summary import parts_table
    from vlmkit.models.vlm import VisionLanguageModel

    path = Path(args.target)
    if path.is_dir():
        model = VisionLanguageModel.from_pretrained(path)
    else:
        recipe = load_config(RecipeConfig, path, args.set)
        model = VisionLanguageModel.from_config(
            recipe.model if isinstance(recipe, RecipeConfig) else ModelConfig()
        )
    console = Console()
    console.print(parts_table(model, title=str(path)))
    console.print(
        f"visual tokens per image: {model.tokens_per_image()}  "
        f"(tower {model.vision.num_patches()} patches -> bridge {type(model.bridge).__name__})"
    )
    if model.llava_next:  # LLaVA-NeXT layout: the count follows the image's size
        proc, s = model.processor, model.vision.image_size
        examples = ", ".join(
            f"{w}x{h}: {proc.image_tokens(proc.images.layout((w, h)))}"
            for w, h in ((s, s), (2 * s, s), (3 * s, 2 * s))
        )
        console.print(f"anyres_layout llava_next: tokens per image follow its size ({examples})")
    size = model.vision.image_size
    console.print(
        f"GPT-4V/4o would count an image of the model's input size {size}x{size} as "
        f"{gpt4v_image_tokens(size, size, 'high')} (detail high) or {gpt4v_image_tokens(size, size, 'low')} "
        "(detail low) tokens"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-hf", help="export a vlmkit model to transformers Llava / LlavaNext (and vLLM)"
    )
    p.add_argument("model_dir")
    p.add_argument("out_dir")
    p.set_defaults(func=_export)

    p = subparsers.add_parser(
        "import-hf", help="import a transformers Llava / LlavaNext checkpoint directory"
    )
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.set_defaults(func=_import)

    p = subparsers.add_parser(
        "info", help="build a model from a recipe (or load a model dir) and show its parts"
    )
    p.add_argument("target", help="recipe YAML or saved model directory")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=_info)
