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
    assert (
        bench.main(
            ["--smoke", "--scenes", "12", "--steps", "2", "--warmup", "1", "--before", "--profile", "1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"vlmkit", "transformers+peft"} <= rows
    mfu = float(re.search(r"^mfu=([\d.]+)$", out, re.M).group(1))  # the LLaVA-shaped part (on CPU here)
    ratio = float(re.search(r"^ratio=([\d.]+)$", out.splitlines()[-1]).group(1))
    assert 0 < mfu < 1 and ratio > 0
    assert re.search(r"vlmkit before -> now: [\d.]+ -> [\d.]+ s/step", out)
    # the profile: each step phase and the op kinds, per loop; the phases add up to no more than the step
    profile = out[out.index("where a step's time goes") :]
    step = [float(x) for x in re.search(r"step \(wall, profiled\)\s+(.*)", profile).group(1).split()]
    phases = [
        [float(x) for x in re.search(rf"{name}\s+(.*)", profile).group(1).split()]
        for name in ("step.data", "step.forward", "step.backward", "step.optimizer")
    ]
    assert len(step) == 3 and all(v > 0 for v in step)  # vlmkit, the peer, vlmkit before
    for i, total in enumerate(step):
        assert phases[1][i] > 0 and phases[2][i] > 0  # forward and backward seen in every loop
        assert sum(p[i] for p in phases) <= total * 1.05 + 1
    assert re.search(r"matmul\s+\d+ \(", profile) and "python / framework" in profile
