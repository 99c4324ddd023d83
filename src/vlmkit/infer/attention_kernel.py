"""A CPU kernel for the attention of one decode step (`csrc/decode_attention.cpp`), built from source on first use
with PyTorch's own extension builder (`torch.utils.cpp_extension`: a C++ compiler and `ninja`) and cached.

Why: at one query per row, SDPA's CPU flash kernel spends its time in per-(row, head) block bookkeeping and small
GEMM calls, not in arithmetic: ~170 µs per layer at 8 rows × ~100 keys for SmolLM2-135M, a fifth of a decode step
(docs/serving.md, "Where the time goes"). This kernel runs each (row, key/value head) as plain loops over its keys
that the compiler vectorizes: the query heads sharing a key/value head read each key once, fp32 arithmetic, softmax
with a vectorizable exp (~1 ulp), the result rounded once to the input dtype — ~2× faster at these sizes. It is not
bit-identical to SDPA (SDPA rounds the probabilities to bf16 before multiplying the values; this keeps them in
fp32): `tests/test_attention_kernel.py` bounds the difference against an fp32 reference.

Built for the machine it runs on (`-march=native`; the build's name carries a digest of the source, the flags and
the CPU, so another CPU or a changed source builds anew). Where no compiler is found or the build fails, `load()`
returns None with the reason logged, and the lean forward keeps SDPA.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from vlmkit.log import get_logger

logger = get_logger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
FLAGS = ["-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fopenmp"]
MAX_DIM = 256  # head size
MAX_REP = 16  # query heads per key/value head

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

_lock = threading.Lock()
_loaded: dict[str, Kernel | None] = {}
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
        SOURCE.read_bytes(),
        " ".join(FLAGS).encode(),
        _cpu_id().encode(),
        torch.__version__.encode(),
    ):
        digest.update(part)
    return f"vlmkit_decode_attention_{digest.hexdigest()[:12]}"


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


def load(verbose: bool = False) -> Kernel | None:
    """The kernel (built on the first call of a process that finds no cached build: ~20 s), or None where it
    cannot be built (the reason logged once)."""
    name = build_name()
    with _lock:
        if name in _loaded:
            return _loaded[name]
        reason = unavailable()
        kernel: Kernel | None = None
        if reason is None:
            from torch.utils import cpp_extension

            logger.info("loading the decode attention kernel (built on first use, ~20 s, then cached)")
            try:
                module = cpp_extension.load(
                    name=name,
                    sources=[str(SOURCE)],
                    extra_cflags=FLAGS,
                    extra_ldflags=["-fopenmp"],
                    verbose=verbose,
                )
                kernel = module.decode_attention
            except Exception as err:  # a compiler or toolchain problem: keep SDPA
                reason = f"the build failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err}"
        if kernel is None:
            logger.info("decode attention kernel off (%s): SDPA is used", reason)
            _reason[name] = reason or ""
        _loaded[name] = kernel
        return kernel


def why_not() -> str | None:
    """The reason the last `load()` returned None (None if it loaded or was not tried)."""
    return _reason.get(build_name())


def supports(head_dim: int, rep: int, dtype: torch.dtype) -> bool:
    """Whether the kernel handles this attention shape and dtype."""
    return head_dim <= MAX_DIM and rep <= MAX_REP and dtype in (torch.float32, torch.bfloat16)
