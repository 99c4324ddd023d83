"""Generated data in a run directory (`data.synthetic`): written once, reused while the generator's settings are
the same, and never silently reused when they changed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vlmkit.config import DataConfig
from vlmkit.shapesworld.data import ShapesWorldConfig
from vlmkit.train.data import prepare_data


def _cfg(**kw) -> DataConfig:
    return DataConfig(
        synthetic=ShapesWorldConfig(n_train=6, n_val=2, n_test=2, tasks=["caption", "pope"], **kw)
    )


def test_generated_data_is_reused_only_with_the_same_generator_settings(tmp_path: Path) -> None:
    first = prepare_data(_cfg(), tmp_path)
    train = Path(first.train)
    assert train.is_file() and json.loads(train.read_text())
    before = train.stat().st_mtime_ns
    again = prepare_data(_cfg(), tmp_path)
    assert again.train == first.train and train.stat().st_mtime_ns == before  # reused, not rewritten
    with pytest.raises(ValueError, match=r"data\.synthetic.*train_pope_binding") as err:
        prepare_data(_cfg(train_pope_binding=1.0), tmp_path)
    assert str(tmp_path / "data") in str(err.value)
    assert train.stat().st_mtime_ns == before  # nothing overwritten
    # a run directory from before the settings were recorded: its data is used as it is
    (tmp_path / "data" / "generator.json").unlink()
    assert prepare_data(_cfg(train_pope_binding=1.0), tmp_path).train == first.train
    assert not (tmp_path / "data" / "generator.json").exists()  # what made it is unknown: nothing is claimed


def test_generator_record_is_written_with_the_data(tmp_path: Path) -> None:
    cfg = _cfg(train_pope_binding=0.5)
    prepare_data(cfg, tmp_path)
    recorded = json.loads((tmp_path / "data" / "generator.json").read_text())
    assert recorded == json.loads(json.dumps(dataclasses.asdict(cfg.synthetic)))
