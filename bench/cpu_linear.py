"""vlmkit's bf16 CPU linear (infer/csrc/linear.cpp) against oneDNN's prepacked linear (what PyTorch's inductor
uses for CPU linears), on the linears of one SmolLM2-135M forward: 30 layers x (q/k/v fused 960x576, output
576x576, gate/up fused 3072x576, down 576x1536) + the 49152x576 LM head, each with its own random weights (~270 MB
in bf16, more than the caches: streamed from memory as in a served decode step), at decode batch sizes and at one
prompt size.

Prints per row count the milliseconds for the whole chain (best of `--rounds`, the two alternated) and
`ratio=<oneDNN / vlmkit>` (above 1: vlmkit faster), plus the largest error of each against an fp64 reference on
one weight. Needs a CPU with AVX512-BF16 (the kernel is not built otherwise).

    .venv/bin/python bench/cpu_linear.py [--rows 1 8 32 256] [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from vlmkit.infer import kernels

LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 256])
    parser.add_argument("--threads", type=int, default=1, help="as `vlmkit serve` on 2 cores (all but one)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ops = kernels.load()
    if ops is None or not ops.has_bf16_linear():
        raise SystemExit(f"vlmkit's bf16 linear is not built here: {kernels.why_not() or 'no AVX512-BF16'}")
    g = torch.Generator().manual_seed(0)
    shapes = LAYER * 30 + [(49152, 576)]
    weights = [(torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16) for n, k in shapes]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    ours = [ops.pack_linear(w) for w in weights]
    print(
        f"{os.cpu_count()} cores, {args.threads} thread(s), {sum(w.numel() for w in weights) * 2 / 1e6:.0f} MB of weights"
    )
    for rows in args.rows:
        xs = {k: torch.randn(rows, k, generator=g).to(torch.bfloat16) for k in (576, 1536)}

        def run_onednn(xs=xs):
            for w, p in zip(weights, onednn):
                torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")

        def run_ours(xs=xs):
            for w, p in zip(weights, ours):
                ops.linear(xs[w.shape[1]], p, None, w.shape[0])

        times: dict[str, list[float]] = {"oneDNN": [], "vlmkit": []}
        run_onednn(), run_ours()
        for rnd in range(args.rounds):
            pairs = [("oneDNN", run_onednn), ("vlmkit", run_ours)]
            for name, fn in pairs if rnd % 2 == 0 else reversed(pairs):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        a, b = min(times["oneDNN"]), min(times["vlmkit"])
        w, x = weights[2], xs[576]
        exact = x.double() @ w.double().T
        err_a = (
            (torch.ops.mkldnn._linear_pointwise(x, onednn[2], None, "none", [], "").double() - exact)
            .abs()
            .max()
        )
        err_b = (ops.linear(x, ours[2], None, w.shape[0]).double() - exact).abs().max()
        print(
            f"rows={rows:4d}  oneDNN {1000 * a:7.2f} ms  vlmkit {1000 * b:7.2f} ms  "
            f"max error {err_a:.4f} vs {err_b:.4f}  ratio={a / b:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
