"""bench/train_step.py runs end to end (tiny random models): both loops, the ratio, MFU, the CUDA part's path."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_bench_reports_both_loops_ratio_and_mfu(capsys):
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--scenes", "12", "--steps", "2", "--warmup", "1", "--before"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"vlmkit", "transformers+peft"} <= rows
    mfu = float(re.search(r"^mfu=([\d.]+)$", out, re.M).group(1))  # the LLaVA-shaped part (on CPU here)
    ratio = float(re.search(r"^ratio=([\d.]+)$", out.splitlines()[-1]).group(1))
    assert 0 < mfu < 1 and ratio > 0
    assert re.search(r"vlmkit before -> now: [\d.]+ -> [\d.]+ s/step", out)
