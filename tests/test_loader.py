"""Data loading off the training thread: DataLoader workers, batch order independent of them, exact restarts."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from vlmkit.cli import main
from vlmkit.config import DataConfig, StageConfig
from vlmkit.data.collate import Collator, PackingCollator
from vlmkit.data.dataset import VLMDataset
from vlmkit.data.loader import BatchAssembler, BatchLoader, BatchOrder, DatasetBatches, PositionStream
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.shapesworld.world import generate_shapesworld
from vlmkit.train.data import StageData
from vlmkit.train.feature_cache import maybe_feature_cache
from vlmkit.train.metrics import read_metrics
from vlmkit.train.stages import apply_stage

from conftest import tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
LORA = "{r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_shapesworld(
        out, 20, seed=0, image_size=32, tasks=("caption", "counting"), splits={"train": 20, "val": 4}
    )
    return out  # train.json: 40 records


def _stage_data(processor, root: Path, **kw) -> StageData:
    cfg = DataConfig(max_length=128)
    train = VLMDataset.from_config(cfg, root / "train.json", processor)
    collate = kw.pop("collate", Collator(processor.tokenizer.pad_token_id, "right"))
    return StageData(train, None, collate, kw.pop("batch_size", 4), 0, kw.pop("group_by_length", False), **kw)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def _run(data: StageData, start: tuple[int, int], n: int) -> list[dict]:
    epoch, pos, out = *start, []
    for _ in range(n):
        batch, epoch, pos = data.next_batch(epoch, pos)
        out.append(batch)
    data.close()
    return out


# ------------------------------------------------------------------------------------------------ order
class _PidStream(PositionStream):
    """Batches that say which process built them."""

    def make(self, epoch: int, pos: int) -> dict:
        return {"pid": os.getpid(), "noise": torch.rand(1).item(), "py": random.random()}


def test_batches_are_built_in_worker_processes_and_come_back_in_position_order():
    loader = BatchLoader(lambda e, p: _PidStream((e, p), 5, seed=3), 5, num_workers=2, prefetch_factor=2)
    got, epoch, pos = [], 0, 3
    for _ in range(8):  # crosses an epoch boundary: (0, 3) (0, 4) (1, 0) ... (1, 5) is (2, 0)
        batch, e, p = loader.next_batch(epoch, pos)
        got.append(((epoch, pos), (e, p), batch))
        epoch, pos = e, p
    loader.close()
    pids = [b["pid"] for *_, b in got]
    assert os.getpid() not in pids and len(set(pids)) == 2  # off the training thread, in two processes
    assert pids[0::2] == [pids[0]] * 4 and pids[1::2] == [pids[1]] * 4  # worker w builds w, w + 2, ...
    assert [after for _, after, _ in got][:3] == [(0, 4), (0, 5), (1, 1)]
    # the randomness a batch sees depends on its position alone: the same in the main process
    state = torch.get_rng_state()
    inline = BatchLoader(lambda e, p: _PidStream((e, p), 5, seed=3), 5, num_workers=0)
    for asked, _, batch in got:
        again, *_ = inline.next_batch(*asked)
        assert again["pid"] == os.getpid()
        assert (again["noise"], again["py"]) == (batch["noise"], batch["py"])
    assert torch.equal(torch.get_rng_state(), state)  # and the training RNG is left as it was


def test_batch_order_is_todays_order_and_ranks_take_contiguous_slices():
    order = BatchOrder(40, 4, seed=5)
    gen = torch.Generator().manual_seed(5 * 100_003 + 1)
    assert order.epoch_order(1) == torch.randperm(40, generator=gen).tolist()
    assert order.steps_per_epoch == 10
    ranks = [BatchOrder(40, 2, seed=5, rank=r, world=2) for r in range(2)]
    for pos in range(5):
        assert (
            ranks[0].indices(1, pos) + ranks[1].indices(1, pos) == order.epoch_order(1)[4 * pos : 4 * pos + 4]
        )


# ------------------------------------------------------------------------------------------------ StageData
@pytest.mark.parametrize("packing", [False, True], ids=["pad", "pack"])
def test_workers_give_the_batches_of_the_training_thread(tiny_vlm, shapes, packing):
    pad = tiny_vlm.tokenizer.pad_token_id
    collate = PackingCollator(pad, 128) if packing else Collator(pad, "right")
    kw = {"collate": collate, "group_by_length": packing, "loss_average": "sample"}
    inline = _run(_stage_data(tiny_vlm.processor, shapes, **kw), (0, 0), 14)  # 10 batches an epoch
    workers = _run(_stage_data(tiny_vlm.processor, shapes, num_workers=2, **kw), (0, 0), 14)
    for a, b in zip(inline, workers):
        _same(a, b)
    assert "label_weights" in inline[0] and inline[0]["pixel_values"].shape[1:] == (3, 32, 32)
    # a restart anywhere (a resume) continues with exactly the batches of the uninterrupted sequence
    resumed = _run(_stage_data(tiny_vlm.processor, shapes, num_workers=2, **kw), (0, 7), 7)
    for a, b in zip(inline[7:], resumed):
        _same(a, b)
    epoch_ids = [i for b in inline[:10] for row in b["sample_ids"] for i in row.split("+")]
    assert len(epoch_ids) == len(set(epoch_ids)) == 40  # each sample once per epoch


def test_cached_features_are_looked_up_in_the_workers(shapes, tmp_path):
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_model_config())
    apply_stage(model, StageConfig(preset="align"))  # frozen tower: the cache applies
    batches = {}
    for workers in (0, 2):
        data = _stage_data(model.processor, shapes, num_workers=workers)
        data.feature_cache = maybe_feature_cache(model, data, tmp_path, DataConfig(max_length=128))
        assert data.feature_cache is not None
        stream = data._stream(0, 0)
        assert pickle.loads(pickle.dumps(stream)).dataset.feature_source is not None  # spawn-safe
        batches[workers] = _run(data, (0, 0), 3)
    for a, b in zip(batches[0], batches[2]):
        assert "pixel_values" not in a and a["vision_features"].shape[1:] == (16, 32)  # [I, N, Dv]
        _same(a, b)


def test_the_stream_pickles_without_the_model(tiny_vlm, shapes):
    data = _stage_data(tiny_vlm.processor, shapes)
    blob = pickle.dumps(DatasetBatches(data.train, data._order(), BatchAssembler(data.collate), (0, 0)))
    assert b"VisionLanguageModel" not in blob and b"LlamaForCausalLM" not in blob


def test_cuda_batches_come_pinned_and_equal_the_cpu_ones(tiny_vlm, shapes):
    device = torch.device("cuda")
    assert _stage_data(tiny_vlm.processor, shapes, device=device).loader().pin_memory
    assert not _stage_data(tiny_vlm.processor, shapes).loader().pin_memory
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the copy itself is not run")
    on_cpu = _run(_stage_data(tiny_vlm.processor, shapes, num_workers=2), (0, 0), 3)
    on_gpu = _run(_stage_data(tiny_vlm.processor, shapes, num_workers=2, device=device), (0, 0), 3)
    for a, b in zip(on_cpu, on_gpu):
        assert b["input_ids"].is_cuda and b["pixel_values"].is_cuda
        _same(a, {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in b.items()})


def test_bad_loader_settings_fail_before_any_work():
    with pytest.raises(ValueError, match="num_workers"):
        BatchLoader(lambda e, p: None, 1, num_workers=-1)
    with pytest.raises(ValueError, match="prefetch_factor"):
        BatchLoader(lambda e, p: None, 1, prefetch_factor=0)


# ------------------------------------------------------------------------------------------------ trainer
def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def test_training_with_two_workers_gives_the_losses_of_none(tmp_path):
    """One instruct stage over more than one epoch, the collation done in the workers: packing, length groups,
    per-sample loss weights."""
    stage = (
        f"stages=[{{name: instruct, preset: instruct, lora: {LORA}, lr: 1.0e-3, max_steps: 5, batch_size: 8,"
        " loss_average: sample}]"
    )
    common = [stage, "data.synthetic.n_train=3", "data.synthetic.n_val=2", "data.packing=true"]
    common += ["data.group_by_length=true", "train.plot=false", "train.save_every=0"]
    for workers in (0, 2):
        out = str(tmp_path / f"w{workers}")
        assert main(["train", TINY, "--out", out, "--set", *common, f"train.num_workers={workers}"]) == 0
    inline, workers = _losses(tmp_path / "w0"), _losses(tmp_path / "w2")
    assert sorted(inline) == list(range(1, 6))
    assert max(r.get("epoch", 0) for r in read_metrics(tmp_path / "w0" / "metrics.jsonl")) >= 1
    assert inline == workers  # exactly: the same batches, in the same order
