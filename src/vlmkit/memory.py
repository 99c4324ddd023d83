"""Process memory: peak resident size and giving freed heap pages back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from functools import cache


def peak_rss_gib() -> float:
    """Peak resident memory of this process in GiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


@cache
def _malloc_trim():  # noqa: ANN202
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None


def release_free_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc `malloc_trim`); True where that was possible.

    Training steps allocate activations of a different size every batch; glibc keeps the freed blocks in its
    heap, so without this the resident size creeps up step by step (measured: +0.7 GiB over 180 SmolLM2
    steps) although PyTorch holds no more tensors.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
