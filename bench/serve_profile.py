"""Where `vlmkit serve`'s model thread spends its time, in one process, no HTTP: the continuous-batching engine
(infer/engine.py) on the `serve_vs_vllm.py` model (CLIP-B/32 random + MLP + SmolLM2-135M), 8 image requests (`--rows`).

Variants alternate (A B, B A, ...) so that a loaded machine affects them alike (`--variants`, default hf lean together
kernels linear):
  unfused: linears prepacked one by one, each row's images encoded when its prefill starts, transformers' forward;
  hf:      q/k/v and gate/up fused into one packed linear each (`fuse_projections`), and the images of the rows
           prefilled together in a step encoded in one tower call, in groups of at most `prefill_chunk` prompt
           tokens (`Engine(encode_ahead=True)`); transformers' forward (`Engine(lean=False)`);
  lean:    as hf, with the LLM run by the lean forward (infer/lean.py, `Engine(lean=True)`), prompts prefilled one
           by one, PyTorch's ops only (`cpu_kernels=False`);
  together: as lean, with the whole prompts of rows starting in a step prefilled together in one LLM call
           (`Engine(prefill_together=True)`: up to `--prefill-burst` tokens while nothing decodes);
  kernels: as together, with the CPU decode kernels (infer/kernels.py), linears still oneDNN's;
  linear:  as kernels, with bf16 linears by vlmkit's own (csrc/linear.cpp, AVX512-BF16 without AMX; else oneDNN's
           as in kernels): the server's defaults.

Printed per variant (best of the rounds): the prefill of 8 new rows (all arriving at once, nothing decoding) split
into image preprocessing, tower + bridge, LLM prefill and the rest, the median time to each row's first token, and
one decode step at batch 8 split into linears, attention, other ops and Python (torch.profiler self times; Python =
wall - ops; the CPU kernels are not PyTorch ops: their time counts as Python). The greedy answers of the variants
with PyTorch's ops must be equal; for the kernel variants, how many tokens agree is printed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/serve_profile.py [--rounds 3] [--threads 1] [--variants hf lean]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from serve_vs_vllm import build_model  # bench/: the same model

from vlmkit.infer.engine import Engine, RowSink
from vlmkit.infer.generate import ChatRequest
from vlmkit.infer.server import build_predictor
from vlmkit.models.generation import GenerationConfig

LINEAR = ("mkldnn::_linear_pointwise", "aten::linear", "aten::addmm", "aten::mm")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::bmm", "aten::_softmax")


def request(seed: int, tokens: int) -> ChatRequest:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).resize(
        (320, 240), Image.NEAREST
    )
    text = f"Describe picture number {seed} in detail."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return ChatRequest(messages, [image], GenerationConfig(max_new_tokens=tokens, eos_token_ids=[-1]))


class Timed:
    """Wall time spent in a callable, accumulated."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def measure(engine: Engine, seed: int, tokens: int, steps: int) -> tuple[dict, list[list[int]]]:
    model, processor = engine.model, engine.processor
    tower, pixels = Timed(model.encode_images), Timed(processor.pixels)
    model.encode_images, processor.pixels = tower, pixels
    llm = Timed(engine.batch.step_fn)
    step_fn = engine.batch.step_fn
    engine.batch.step_fn = lambda embeds, *rest: (llm if embeds.shape[1] > 1 else step_fn)(embeds, *rest)
    done, firsts = [], []
    try:
        start = time.perf_counter()
        for i in range(engine.max_rows):
            sink = RowSink(
                on_text=lambda delta: None,
                on_done=done.append,
                on_first_token=lambda: firsts.append(time.perf_counter() - start),
            )
            engine.add(engine.prepare(request(seed + i, tokens)), sink)
        engine.step()  # nothing decodes: every row is prefilled in this step (+ one decode step)
        prefill = time.perf_counter() - start
        out = {
            "prefill": prefill,
            "pixels": pixels.seconds,
            "tower": tower.seconds,
            "llm": llm.seconds,  # prompt chunks only (not the decode step that follows)
            "ttft_p50": statistics.median(firsts),
        }
    finally:
        del model.encode_images, processor.pixels
        engine.batch.step_fn = step_fn
    for _ in range(3):
        engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - start) / steps
    self_us: dict[str, float] = {}
    for event in prof.key_averages():
        self_us[event.key] = event.self_cpu_time_total
    ops = sum(self_us.values()) / 1e6 / steps
    out["decode"] = wall
    out["linear"] = sum(self_us.get(k, 0.0) for k in LINEAR) / 1e6 / steps
    out["attention"] = sum(self_us.get(k, 0.0) for k in ATTENTION) / 1e6 / steps
    out["other_ops"] = ops - out["linear"] - out["attention"]
    out["python"] = max(0.0, wall - ops)
    while engine.busy:
        engine.step()
    return out, [r.token_ids for r in done]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="as `vlmkit serve` on 2 cores (all but one)")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10, help="decode steps profiled")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["hf", "lean", "together", "kernels", "linear"],
        choices=["unfused", "hf", "lean", "together", "kernels", "linear"],
    )
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--rows", type=int, default=8, help="requests arriving at once (the decode batch)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "vlmkit" / "serve-profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir, _ = build_model(args.work)
    common = {"max_rows": args.rows, "prefill_chunk": args.prefill_chunk}

    def onednn():  # linears packed for oneDNN (the `linear` variant: vlmkit's bf16 linear where it applies)
        return build_predictor(model_dir, dtype="auto", prepack=True, cpu_kernels=False)

    builders = {
        "unfused": lambda: Engine(
            build_predictor(model_dir, dtype="auto", prepack=True, fuse=False, cpu_kernels=False),
            encode_ahead=False,
            lean=False,
            **common,
        ),
        "hf": lambda: Engine(onednn(), lean=False, cpu_kernels=False, **common),
        "lean": lambda: Engine(
            onednn(),
            prefill_together=False,
            cpu_kernels=False,
            **common,
        ),
        "together": lambda: Engine(onednn(), cpu_kernels=False, **common),
        "kernels": lambda: Engine(onednn(), **common),
        "linear": lambda: Engine(build_predictor(model_dir, dtype="auto", prepack=True), **common),
    }
    engines = {name: builders[name]() for name in args.variants}
    if any(
        engines[name].lean is None for name in ("lean", "together", "kernels", "linear") if name in engines
    ):
        raise SystemExit("the lean forward does not apply to this model (see the log)")
    print(f"{os.cpu_count()} cores, {args.threads} model thread(s), load average {os.getloadavg()[0]:.1f}")
    results: dict[str, list[dict]] = {name: [] for name in engines}
    answers: dict[str, list] = {name: [] for name in engines}
    for engine in engines.values():  # warm-up
        measure(engine, 10**6, 4, 2)
    for rnd in range(args.rounds):
        order = list(engines) if rnd % 2 == 0 else list(reversed(engines))
        for name in order:
            res, tokens = measure(engines[name], 100 * rnd, args.tokens, args.steps)
            results[name].append(res)
            answers[name].append(tokens)
    print(f"load average {os.getloadavg()[0]:.1f} at the end; ms, best of {args.rounds} rounds")
    keys = [
        "prefill",
        "pixels",
        "tower",
        "llm",
        "ttft_p50",
        "decode",
        "linear",
        "attention",
        "other_ops",
        "python",
    ]
    print("variant  " + " ".join(f"{k:>9s}" for k in keys))
    for name, runs in results.items():
        best = {k: min(r[k] for r in runs) for k in keys}
        print(f"{name:8s} " + " ".join(f"{1000 * best[k]:9.1f}" for k in keys))
    # the variants with PyTorch's ops give transformers' logits bit for bit: equal answers; the kernels round
    # differently (docs/serving.md, "CPU kernels"): how many tokens of each answer agree is reported
    rounding = ("kernels", "linear")
    exact = [a for name, a in answers.items() if name not in rounding]
    same = all(a == exact[0] for a in exact)
    print(f"greedy answers equal (PyTorch-op variants): {same}")
    for name in (n for n in rounding if n in answers and exact):
        agree = total = 0
        for ours, ref in zip(answers[name], exact[0]):  # rounds
            for a, b in zip(ours, ref):  # rows
                n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                agree, total = agree + n, total + len(b)
        print(f"{name}: {agree} of {total} tokens before the answers part ({agree / total:.0%})")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
