"""`vlmkit pretrain-vision`: contrastive image–text pretraining of the small ViT (no LLM involved)."""

from __future__ import annotations

import argparse
import json

# `--set` keys that may omit the leading `vision.` (e.g. `vit.dim=192`, `image_size=64`)
_VISION_KEYS = ("vit", "image_size", "select_layer", "image_mean", "image_std", "drop_prefix_tokens", "path")


def _overrides(items: list[str]) -> list[str]:
    out = []
    for item in items:
        key = item.split("=", 1)[0].strip()
        out.append(f"vision.{item.strip()}" if key.split(".")[0] in _VISION_KEYS else item)
    return out


def _pretrain(args: argparse.Namespace) -> int:
    from vlmkit.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
    from vlmkit.train.pretrain_vision import PretrainVisionConfig, pretrain_vision, probe

    data = load_yaml(args.config) if args.config else to_dict(PretrainVisionConfig())
    data["data"] = args.data
    if args.image_root is not None:
        data["image_root"] = args.image_root
    if args.seconds is not None:
        data["max_seconds"] = args.seconds
    if args.steps is not None:
        data["steps"] = args.steps
    try:
        cfg = from_dict(PretrainVisionConfig, apply_overrides(data, _overrides(args.set)))
        out = pretrain_vision(cfg, args.out, progress=not args.no_progress, resume=args.resume)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    if args.probe_val:
        results = probe(out, args.data, args.probe_val, image_root=args.image_root, threads=cfg.threads)
        metrics = json.loads((out / "metrics.json").read_text())
        (out / "metrics.json").write_text(json.dumps({**metrics, "probe": results}, indent=1))
        print(json.dumps({"probe": results}))
    vision = json.loads((out / "vision_config.json").read_text())
    print(f"pretrained ViT: {out / 'vision.safetensors'}")
    print(f"use it with: --set model.vision.path={out} " + _vit_hint(vision))
    return 0


def _vit_hint(vision: dict) -> str:
    """The `--set` overrides a recipe needs to build the same tower (where they differ from the defaults)."""
    from vlmkit.config import VisionConfig, to_dict

    default = to_dict(VisionConfig.make("vit"))
    sets = [f"model.vision.vit.{k}={v}" for k, v in vision["vit"].items() if default["vit"].get(k) != v]
    sets += [
        f"model.vision.{k}={v}"
        for k, v in vision.items()
        if k in ("image_size", "select_layer") and default.get(k) != v
    ]
    return " ".join(sets)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain-vision",
        help="CLIP-style pretraining of the small ViT on image–text pairs (before any LLM training)",
        description="Train the project's small ViT contrastively against a small word-order-aware text "
        "encoder on caption JSONL ({image, caption}) or LLaVA JSON (ShapesWorld: its caption records, plus "
        "binding hard negatives and per-patch label heads from meta.objects). Writes vision.safetensors, "
        "vision_config.json, the text encoder and metrics.json into --out; checkpoints every save_every steps "
        "(--resume continues a killed run).",
    )
    p.add_argument("data", help="caption JSONL or LLaVA JSON(L) with image–text pairs")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--image-root", default=None, help="base for relative image paths (default: the data's dir)"
    )
    p.add_argument(
        "--seconds", type=float, default=None, help="also stop after this much training time (default: none)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default 600; the lr curve's length)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --out/checkpoints (the same result as an uninterrupted run)",
    )
    p.add_argument("--config", default=None, help="YAML with PretrainVisionConfig fields")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. vit.dim=192 batch_size=64 dense_weight=0 (vision keys need no prefix)",
    )
    p.add_argument(
        "--probe-val", default=None, metavar="VAL", help="ShapesWorld val JSON: run linear probes afterwards"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_pretrain)
