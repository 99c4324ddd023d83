"""The run's metrics on --resume: metrics.jsonl and TensorBoard keep one value per step, the resumed run's."""

from __future__ import annotations

import pytest

from vlmkit.train.metrics import MetricsLog, read_metrics


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    first = MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "tb")
    for step in range(1, 6):  # a run killed at step 5, its checkpoint at step 3
        first.write({"step": step, "stage": "fit", "loss": float(step)})
    first.close()
    resumed = MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "tb")
    resumed.truncate_after(3)
    for step in (4, 5):
        resumed.write({"step": step, "stage": "fit", "loss": 10.0 * step})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
    ]
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("fit/loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
    ]
