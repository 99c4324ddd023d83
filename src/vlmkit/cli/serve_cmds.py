"""Inference subcommands: `vlmkit chat` (terminal), `serve` (OpenAI-compatible API + web demo), `web`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vlmkit.infer.decoding import DEFAULT_IMAGE_FORMATS, check_formats


def _chat(args: argparse.Namespace) -> int:
    import sys

    from vlmkit.infer.chat import run_chat, session_config
    from vlmkit.infer.server import build_predictor

    predictor = build_predictor(
        args.model_dir,
        dtype=args.dtype,
        device=args.device,
        prepack=not args.no_prepack,
        system_prompt=args.system,
    )
    config = session_config(
        max_new_tokens=args.max_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else None,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    return run_chat(predictor, sys.stdin, sys.stdout, images=args.image, config=config)


def _server_config(args: argparse.Namespace, web: bool) -> object:
    from vlmkit.infer.api import ServerConfig
    from vlmkit.infer.media import MediaPolicy

    if args.allowed_media_domains and not args.allow_remote_media:
        raise SystemExit("error: --allowed-media-domains needs --allow-remote-media")
    try:
        formats = check_formats(args.image_formats)
    except ValueError as err:
        raise SystemExit(f"error: --image-formats: {err}") from None
    media = MediaPolicy(
        allowed_local_paths=[Path(p) for p in args.allowed_local_media_path],
        allow_remote=args.allow_remote_media,
        allowed_domains=list(args.allowed_media_domains),
        max_image_bytes=args.max_image_bytes,
        max_pixels=args.max_image_pixels,
        image_formats=formats,
    )
    return ServerConfig(
        model_name=args.model_name or Path(args.model_dir).resolve().name,
        max_batch=args.max_batch,
        continuous_batching=not args.no_continuous_batching,
        prefill_chunk=args.prefill_chunk,
        lean_decode=not args.no_lean_decode,
        cpu_kernels=not args.no_cpu_kernels,
        prefill_together=args.prefill_together,
        prefill_burst=args.prefill_burst,
        prefill_threads=available_cores() if args.prefill_threads is None else args.prefill_threads,
        image_cache_mb=args.image_cache_mb,
        prefix_cache_mb=args.prefix_cache_mb,
        batch_window_ms=args.batch_window_ms,
        batch_max_wait_ms=args.batch_max_wait_ms,
        max_queue=args.max_queue,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens_limit),
        max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens,
        max_images_per_request=args.max_images,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout,
        request_timeout_s=args.request_timeout,
        stall_timeout_s=args.stall_timeout,
        max_decoded_pixels=args.max_decoded_pixels,
        media=media,
        web=web,
    )


def model_threads(requested: int | None, cores: int | None = None) -> int:
    """Compute threads for the model: as asked, or all cores but one (left to the HTTP side), at least 1."""
    if requested and requested > 0:
        return requested
    return max(1, (cores or available_cores()) - 1)


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _serve(args: argparse.Namespace, web: bool) -> int:
    import torch

    from vlmkit.infer.server import build_predictor, create_app, serve
    from vlmkit.log import get_logger

    config = _server_config(args, web)
    threads = model_threads(args.threads)
    torch.set_num_threads(threads)
    config.model_cpus = None if args.no_pin else threads
    predictor = build_predictor(
        args.model_dir,
        dtype=args.dtype,
        device=args.device,
        prepack=not args.no_prepack,
        cpu_kernels=not args.no_cpu_kernels,
        system_prompt=args.system,
    )
    app = create_app(predictor, config)  # type: ignore[arg-type]
    log = get_logger("vlmkit.serve")
    log.info("serving %s on http://%s:%d (OpenAI API at /v1)", args.model_dir, args.host, args.port)
    if web:
        log.info("web demo: http://%s:%d/", args.host, args.port)
    serve(app, args.host, args.port)
    return 0


def _add_server_options(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("model_dir")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--model-name", default=None, help="id reported by /v1/models (default: directory name)")
    p.add_argument("--system", default=None, help="system prompt added to every conversation")
    _add_model_options(p)
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, default=32, help="rows decoded together")
    g.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="prompt tokens prefilled per decode step while other requests decode (smaller: steadier streams)",
    )
    g.add_argument(
        "--image-cache-mb",
        type=float,
        default=256.0,
        help="memory for the image-feature cache (visual tokens by image bytes, LRU); 0 turns it off",
    )
    g.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=64.0,
        help="memory for the prefix cache (keys and values of earlier prompts and answers that a new prompt "
        "starts with: a shared system prompt, a conversation's earlier turns; LRU); 0 turns it off",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compute threads of the model (default: all cores but one, at least 1)",
    )
    g.add_argument(
        "--prefill-threads",
        type=int,
        default=None,
        help="compute threads for prefilling prompts (compute-bound; decode steps keep --threads, leaving a core "
        "to the HTTP side; default: all cores; 0: the model's threads)",
    )
    g.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the model thread to its cores (pinned by default, as vLLM's CPU backend does)",
    )
    g.add_argument(
        "--no-continuous-batching",
        action="store_true",
        help="decode requests in windows (each batch runs to its end) instead of joining the running batch",
    )
    g.add_argument(
        "--no-lean-decode",
        action="store_true",
        help="run the LLM through transformers' forward instead of the lean Llama-family forward (same logits, "
        "slower; other LLMs always use transformers')",
    )
    g.add_argument(
        "--no-cpu-kernels",
        action="store_true",
        help="run decode steps with PyTorch's ops only, not vlmkit's CPU kernels (RoPE + cache write + attention, "
        "residual add + RMSNorm, SiLU * up, and the bf16 linears on AVX512-BF16 CPUs without AMX; built with the "
        "C++ compiler on first use, PyTorch's and oneDNN's ops where they cannot be built)",
    )
    g.add_argument(
        "--prefill-together",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with the lean forward, prefill the whole prompts of requests starting in a step in one LLM call: up "
        "to --prefill-chunk tokens while others decode, --prefill-burst while none does (on by default)",
    )
    g.add_argument(
        "--prefill-burst",
        type=int,
        default=1024,
        help="prompt tokens prefilled in one call while no request decodes (a burst of arrivals)",
    )
    g.add_argument(
        "--batch-window-ms",
        type=float,
        default=30.0,
        help="an idle server starts once no request came for this long (requests arriving together are "
        "prefilled together)",
    )
    g.add_argument(
        "--batch-max-wait-ms", type=float, default=100.0, help="...or this long after its first request"
    )
    g.add_argument("--max-queue", type=int, default=256)
    g.add_argument("--default-max-tokens", type=int, default=256)
    g.add_argument("--max-tokens-limit", type=int, default=2048, help="refuse larger max_tokens")
    g.add_argument("--max-prompt-tokens", type=int, default=4096)
    g.add_argument("--max-images", type=int, default=8, help="images per request")
    g.add_argument("--max-image-bytes", type=int, default=10 * 2**20)
    g.add_argument("--max-image-pixels", type=int, default=40_000_000)
    g.add_argument(
        "--max-decoded-pixels",
        type=int,
        default=None,
        help="decoded image pixels all requests may hold at once; more wait (default: max-images x max-image-pixels)",
    )
    g.add_argument(
        "--image-formats",
        nargs="+",
        default=list(DEFAULT_IMAGE_FORMATS),
        metavar="FORMAT",
        help=f"image formats that may be decoded (PIL names; default: {' '.join(DEFAULT_IMAGE_FORMATS)})",
    )
    g.add_argument("--max-body-bytes", type=int, default=32 * 2**20)
    g.add_argument("--body-timeout", type=float, default=30.0, help="seconds for a request body to arrive")
    g.add_argument("--request-timeout", type=float, default=300.0, help="seconds, queueing included")
    g.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        help="/health fails after a batch made no progress this long",
    )
    g = p.add_argument_group("media sources (data: URLs are always accepted)")
    g.add_argument(
        "--allowed-local-media-path",
        action="append",
        default=[],
        metavar="DIR",
        help="allow local paths / file:// URLs under DIR (repeatable; symlinks resolved)",
    )
    g.add_argument("--allow-remote-media", action="store_true", help="allow http(s) image URLs")
    g.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=[],
        metavar="DOMAIN",
        help="hosts http(s) images may come from (example.com, *.example.com)",
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="weights' dtype; auto: bf16 on a CPU with native bf16 (AVX512-BF16/AMX) or a bf16 GPU, else fp32",
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available"
    )
    p.add_argument(
        "--no-prepack",
        action="store_true",
        help="CPU: plain linear weights (default: prepacked for oneDNN, faster, one more copy in memory)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal (/image PATH, /reset, /quit)")
    p.add_argument("model_dir")
    _add_model_options(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="image(s) for the first turn")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=_chat)

    p = subparsers.add_parser("serve", help="OpenAI-compatible server (/v1/chat/completions) + web demo at /")
    _add_server_options(p, 8000)
    p.add_argument("--no-web", action="store_true", help="do not serve the web demo at /")
    p.set_defaults(func=lambda args: _serve(args, web=not args.no_web))

    p = subparsers.add_parser("web", help="the web demo (upload an image, chat, see boxes) and its API")
    _add_server_options(p, 7860)
    p.set_defaults(func=lambda args: _serve(args, web=True))
