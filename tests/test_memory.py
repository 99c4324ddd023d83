"""Giving freed heap pages back to the OS, and the peak-RSS reading the quickstart reports."""

from __future__ import annotations

import os
import sys

import pytest

from vlmkit.memory import HeapReleaser, peak_rss_gib, release_free_memory


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


def _heap_blocks(mib: int) -> list[bytes]:
    return [bytes(2000) + i.to_bytes(4, "little") for i in range(mib * 2**20 // 2000)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim, /proc")
def test_heap_releaser_keeps_the_working_set_and_releases_growth_past_it():
    releaser = HeapReleaser(margin_bytes=120 * 2**20, settle_steps=2)
    for _ in range(2):  # settling: the working set is the highest resident size of these steps
        step = _heap_blocks(100)  # a step's activations, freed at its end
        pin = step[-1]
        del step
        assert releaser.step_done() is False
    for _ in range(3):  # same-sized steps reuse the freed blocks: nothing is released (or faulted in again)
        step = _heap_blocks(100)
        del step
        assert releaser.step_done() is False
    big = _heap_blocks(400)  # the heap grew far past the working set
    pin = big[-1]
    del big
    before = _rss_bytes()
    assert releaser.step_done() is True
    assert before - _rss_bytes() > 200 * 2**20
    assert releaser.releases == 1 and pin
    assert releaser.step_done() is False  # measuring the working set again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim, /proc")
def test_heap_releaser_restart_hands_back_what_work_between_steps_left():
    """Validation or a checkpoint between steps grows the heap less than the margin: `step_done` would keep it,
    `restart` hands it back and measures the working set anew."""
    releaser = HeapReleaser(margin_bytes=1024 * 2**20, settle_steps=1)
    step = _heap_blocks(50)
    del step
    assert releaser.step_done() is False
    extra = _heap_blocks(300)  # e.g. generation during validation, freed afterwards
    pin = extra[-1]
    del extra
    assert releaser.step_done() is False  # under the margin: kept
    before = _rss_bytes()
    assert releaser.restart() is True
    assert before - _rss_bytes() > 150 * 2**20 and pin
    assert releaser.working_set == 0 and releaser.settled == 0
