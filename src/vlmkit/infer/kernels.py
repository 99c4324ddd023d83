"""CPU kernels for the lean forward's decode steps (`csrc/decode.cpp`), built from source on first use with
PyTorch's own extension builder (`torch.utils.cpp_extension`: a C++ compiler and `ninja`) and cached.

Why: at one token per row, a decode step of a small LLM spends as much time around the matrix products as in them
(docs/serving.md, "Where the time goes"): SDPA's CPU flash kernel in per-(row, head) block bookkeeping and small
GEMM calls (~170 µs per layer at 8 rows × ~100 keys for SmolLM2-135M), and ~20 small elementwise ops per layer
(RoPE, cache writes, residual adds, RMSNorm, SiLU) at a few µs of dispatch each. The kernels here:

* `decode_attention(q [B, KV, R, D], k, v [B, KV, L, D] views, valid [B], scale)`: each (row, key/value head) as
  plain loops over its first valid[b] keys that the compiler vectorizes; the R query heads sharing a key/value head
  read each key once; fp32 arithmetic, softmax with a vectorizable exp (~1 ulp), rounded once to the input dtype;
* `rope_attention(qkv [B, (H + 2KV) D], cos, sin [B, D], keys, values [S, KV, C, D], pos [B], H, KV, scale)`: RoPE
  on q and k as transformers computes it (x*cos + rotate_half(x)*sin, each op rounded to the dtype), k and v written
  into the cache at each row's position, then `decode_attention` over keys 0..pos[b] -> [B, H D];
* `add_rms_norm(hidden, delta, weight, eps)`: the residual sum (rounded) and its RMSNorm times the weight, rounded
  where transformers' LlamaRMSNorm rounds;
* `silu_and_mul(gate_up [..., 2I])`: silu(gate) * up, each rounded;
* `linear(x, packed, bias, n)` over a weight packed by `pack_linear` (`csrc/linear.cpp`, CPUs with AVX512-BF16):
  a bf16 linear that streams the weight faster than oneDNN's at decode batch sizes (`linear_kernels` says where it
  is used; infer/prepack.py packs the served model's linears for it).

None is bit-identical to PyTorch's ops (SDPA rounds the probabilities to bf16 before multiplying the values, these
keep them in fp32; sums run in another order; exp differs by ~1 ulp): `tests/test_kernels.py` bounds each against
an fp64 or PyTorch reference and checks that the served answers stay the same.

Built for the machine it runs on (`-march=native`; the build's name carries a digest of the source, the flags and
the CPU, so another CPU or a changed source builds anew). Where no compiler is found or the build fails, `load()`
returns None with the reason logged, and the lean forward keeps PyTorch's ops.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

from vlmkit.log import get_logger

logger = get_logger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("decode.cpp", "linear.cpp")]
# no contraction of a*b + c into one FMA: elementwise results must round as PyTorch's separate ops do
FLAGS = [
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-fopenmp",
]
MAX_DIM = 256  # head size
MAX_REP = 16  # query heads per key/value head

Kernels = Any  # the built extension module (its ops: the module docstring)

_lock = threading.Lock()
_loaded: dict[str, Kernels | None] = {}
_reason: dict[str, str] = {}


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
        model = next((line for line in text.splitlines() if line.startswith("model name")), "")
        return model + flags
    except OSError:
        return platform.processor() or platform.machine()


def build_name() -> str:
    digest = hashlib.sha256()
    for part in (
        *(source.read_bytes() for source in SOURCES),
        " ".join(FLAGS).encode(),
        _cpu_id().encode(),
        torch.__version__.encode(),
    ):
        digest.update(part)
    return f"vlmkit_decode_{digest.hexdigest()[:12]}"


def unavailable() -> str | None:
    """Why the kernel cannot be built here (None: it can be tried)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"built and tested on x86-64 only, not {platform.machine()}"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (c++ / g++) on PATH"
    try:
        import ninja  # noqa: F401
    except ImportError:
        return "the ninja package is not installed"
    return None


def load(verbose: bool = False) -> Kernels | None:
    """The kernels (built on the first call of a process that finds no cached build: ~30 s), or None where they
    cannot be built (the reason logged once)."""
    name = build_name()
    with _lock:
        if name in _loaded:
            return _loaded[name]
        reason = unavailable()
        kernel: Kernels | None = None
        if reason is None:
            from torch.utils import cpp_extension

            logger.info("loading vlmkit's CPU decode kernels (built on first use, ~30 s, then cached)")
            try:
                module = cpp_extension.load(
                    name=name,
                    sources=[str(source) for source in SOURCES],
                    extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"],
                    verbose=verbose,
                )
                kernel = module
            except Exception as err:  # a compiler or toolchain problem: keep SDPA
                reason = f"the build failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err}"
        if kernel is None:
            logger.info("CPU decode kernels off (%s): PyTorch's ops are used", reason)
            _reason[name] = reason or ""
        _loaded[name] = kernel
        return kernel


def _has_amx() -> bool:
    return "amx_bf16" in _cpu_id().split()


def linear_kernels() -> Kernels | None:
    """The kernels for the served model's bf16 linears (`pack_linear`/`linear`), or None for oneDNN's: where they
    build with AVX512-BF16 and the CPU has no AMX (there oneDNN's AMX kernels are kept: not measured against here)."""
    kernel = load()
    if kernel is None or not kernel.has_bf16_linear():
        return None
    if _has_amx():
        logger.info("CPU with AMX: oneDNN's packed linears are kept")
        return None
    return kernel


def why_not() -> str | None:
    """The reason the last `load()` returned None (None if it loaded or was not tried)."""
    return _reason.get(build_name())


def supports(head_dim: int, rep: int, dtype: torch.dtype) -> bool:
    """Whether the kernels handle this attention shape and dtype."""
    return head_dim <= MAX_DIM and rep <= MAX_REP and dtype in (torch.float32, torch.bfloat16)


class QuickGELU(torch.nn.Module):
    """CLIP's QuickGELU (x * sigmoid(1.702 x)) by `quick_gelu`: one pass instead of three ops (each rounded as
    PyTorch's)."""

    def __init__(self, kernels: Kernels) -> None:
        super().__init__()
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        return self.kernels.quick_gelu(x)


def swap_activations(module: torch.nn.Module, kernels: Kernels) -> int:
    """Replace transformers' QuickGELU modules in `module` (a served vision tower) by `QuickGELU`; returns how many."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "QuickGELUActivation":
                setattr(parent, name, QuickGELU(kernels))
                swapped += 1
    return swapped
