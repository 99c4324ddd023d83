"""Giving freed heap pages back to the OS, and the peak-RSS reading the quickstart reports."""

from __future__ import annotations

import os
import sys

import pytest

from vlmkit.memory import peak_rss_gib, release_free_memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_free_memory_returns_freed_heap_pages():
    blocks = [bytes(2000) + i.to_bytes(4, "little") for i in range(150_000)]  # ~300 MB of heap blocks
    pin = blocks[-1]  # the newest block stays: the heap's top cannot shrink by itself
    del blocks
    before = _rss_bytes()
    assert release_free_memory() is True
    after = _rss_bytes()
    assert before - after > 150 * 2**20, (before, after)
    assert pin and peak_rss_gib() * 2**30 >= before - 16 * 2**20  # the peak saw the blocks (KiB-rounded)
