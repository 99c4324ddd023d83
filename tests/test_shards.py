"""Sharded data: `vlmkit data shard`, lazy reading split across ranks and workers, bad records, exact resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from vlmkit.cli import main
from vlmkit.config import DataConfig, RecipeConfig, StageConfig, load_config
from vlmkit.data import loader as loader_module
from vlmkit.data.collate import Collator
from vlmkit.data.dataset import DataQualityError, RecordEncoder, VLMDataset
from vlmkit.data.formats import read_records
from vlmkit.data.loader import POSITION_KEY, BatchAssembler
from vlmkit.data.sources import stream as stream_module
from vlmkit.data.sources.shards import Shard, find_shards, is_sharded, read_shard
from vlmkit.data.sources.stream import ShardPlan
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.shapesworld.world import generate_shapesworld
from vlmkit.train.checkpoint import latest_checkpoint
from vlmkit.train.data import ShardSource, StageData
from vlmkit.train.metrics import read_metrics
from vlmkit.train.stages import apply_stage
from vlmkit.train.strategies import build_strategy

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
TURN = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Shapes."}]
GOOD_EXTRA = {"pair", "llava-wild", "text-only"}  # the extra shard's usable records
BAD = {"corrupt-image": "corrupt", "broken": "malformed_json", "silent": "no_assistant_turn"}


def _png(color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(out, fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """ShapesWorld (25 scenes, captions + counting: 50 records) + a record with a corrupt image, written by
    `vlmkit data shard` into 6 tar shards (`wds/`; records with a missing or a remote image left out), + `wds/extra.tar`
    written by hand with 5 records as other tools write them (2 bad). 56 records, 53 usable."""
    root = tmp_path_factory.mktemp("corpus")
    files = generate_shapesworld(
        root / "data",
        25,
        seed=0,
        image_size=32,
        tasks=("caption", "counting"),
        splits={"train": 25, "val": 3},
    )
    records = json.loads(files["train"].read_text())
    (root / "data" / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    records.append({"id": "corrupt-image", "image": "images/bad.png", "conversations": TURN})
    records.append({"id": "missing-image", "image": "images/nope.png", "conversations": TURN})
    records.append({"id": "remote-image", "image": "https://example.com/a.png", "conversations": TURN})
    (root / "data" / "with_bad.json").write_text(json.dumps(records))
    args = ["data", "shard", str(root / "data" / "with_bad.json"), "--out", str(root / "wds")]
    assert main([*args, "--shard-size", "10"]) == 0
    with TarWriter(str(root / "wds" / "extra.tar"), encoder=False) as tar:
        tar.write({"__key__": "broken", "json": b"{not json"})
        silent = {"id": "silent", "conversations": TURN[:1]}
        tar.write({"__key__": "silent", "json": json.dumps(silent).encode(), "png": _png((9, 9, 9))})
        tar.write({"__key__": "pair", "txt": b"a grey square", "png": _png((128, 128, 128))})  # img2dataset
        tar.write(
            {
                "__key__": "wild",
                "json": json.dumps({"id": "llava-wild", "conversations": TURN}).encode(),
                "jpg": _png((200, 0, 0), "JPEG"),
            }
        )  # LLaVA-style: KEY.json + KEY.jpg, no image field
        text = {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}],
        }
        tar.write({"__key__": "plain", "json": json.dumps(text).encode()})
    assert main(["data", "shard", str(files["val"]), "--out", str(root / "val"), "--format", "parquet"]) == 0
    return root


def _ids(batch: dict) -> list[str]:
    return [i for row in batch["sample_ids"] for i in row.split("+")]


def _source(processor, spec: str, block: int = 8) -> ShardSource:
    cfg = DataConfig(max_length=128, shuffle_buffer=block)
    return ShardSource.build(cfg, spec, processor, StageConfig())


def _stage(processor, spec: str, batch_size: int = 4, **kw) -> StageData:
    collate = Collator(processor.tokenizer.pad_token_id, "right")
    return StageData(
        _source(processor, spec), None, collate, batch_size, 0, kw.pop("group_by_length", False), **kw
    )


def _epochs(data: StageData, n: int) -> list[list[dict]]:
    """Every batch of the first `n` epochs (and not one more), by epoch."""
    out: list[list[dict]] = [[] for _ in range(n)]
    epoch, pos = 0, 0
    for _ in range(n * data.steps_per_epoch):
        batch, epoch, pos = data.next_batch(epoch, pos)
        out[epoch].append(batch)
    data.close()
    return out


# ------------------------------------------------------------------------------------------------ writing
def test_the_shard_command_writes_shards_that_read_back_as_the_records(corpus, capsys):
    source = {r["id"]: r for _, r in read_records(corpus / "data" / "with_bad.json")}
    assert (
        main(
            [
                "data",
                "shard",
                str(corpus / "data" / "with_bad.json"),
                "--out",
                str(corpus / "pq"),
                "--shard-size",
                "16",
                "--format",
                "parquet",
            ]
        )
        == 0
    )
    assert "51/53 samples ok; skipped missing_file=1, remote_image=1" in capsys.readouterr().out
    for spec, kind, counts in (
        (corpus / "wds", "wds", [10] * 5 + [1]),
        (corpus / "pq", "parquet", [16, 16, 16, 3]),
    ):
        shards = find_shards(str(spec))  # from shards.json
        assert [s.count for s in shards] == counts and {s.kind for s in shards} == {kind}
        suffix = ".tar" if kind == "wds" else ".parquet"
        counted = find_shards(str(spec / f"shard-*{suffix}"))  # counted from the files themselves
        assert [(s.name, s.count) for s in counted] == [(s.name, s.count) for s in shards]
        seen = []
        for shard in shards:
            for raw in read_shard(shard):
                record = source[raw.record["id"]]
                assert raw.record["conversations"] == record["conversations"]
                image = corpus / "data" / record["image"]
                assert raw.embedded(record["image"], [record["image"]]) == image.read_bytes()
                seen.append(raw.record["id"])
        assert seen == [i for i in source if i not in ("missing-image", "remote-image")]  # in order, once
    with pytest.raises(SystemExit, match="already holds shards"):
        main(["data", "shard", str(corpus / "data" / "with_bad.json"), "--out", str(corpus / "wds")])


def test_skipping_into_a_shard_reads_the_same_records(corpus):
    for shard in find_shards(str(corpus / "pq")) + find_shards(str(corpus / "wds")):
        keys = [r.key for r in read_shard(shard)]
        assert [r.key for r in read_shard(shard, 3)] == keys[3:]


def test_parquet_written_as_hf_datasets_writes_it_is_read(tiny_vlm, tmp_path):
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "id": ["a", "b"],
            "image": pa.array([{"bytes": red, "path": "red.png"}, {"bytes": blue, "path": None}], image),
            "conversations": pa.array([TURN, TURN], pa.list_(turn)),
        }
    )
    pq.write_table(table, tmp_path / "hf.parquet")  # as HF `datasets` writes an Image column
    two = [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}]
    table = pa.table({"images": [[blue, red]], "conversations": [json.dumps(two)], "task": ["compare"]})
    pq.write_table(table, tmp_path / "raw.parquet")  # image bytes, the conversation as JSON text
    encode = RecordEncoder(tiny_vlm.processor, max_length=128)
    items = [encode(raw) for raw in read_shard(Shard(str(tmp_path / "hf.parquet"), "parquet", 2))]
    items += [encode(raw) for raw in read_shard(Shard(str(tmp_path / "raw.parquet"), "parquet", 1))]
    pixels = {
        b: tiny_vlm.processor.images.tensors(Image.open(io.BytesIO(b)).convert("RGB")) for b in (red, blue)
    }
    assert [it["id"] for it in items] == ["a", "b", "raw.parquet/0"]
    assert torch.equal(items[0]["pixel_values"], pixels[red])
    assert torch.equal(items[1]["pixel_values"], pixels[blue])
    assert torch.equal(items[2]["pixel_values"], torch.cat([pixels[blue], pixels[red]]))  # [2, 3, S, S]


# ------------------------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "length-grouped"])
def test_a_stream_sees_every_usable_record_once_per_epoch_whatever_the_workers(tiny_vlm, corpus, grouped):
    spec = str(corpus / "wds" / "*.tar")
    runs = {
        w: _epochs(_stage(tiny_vlm.processor, spec, num_workers=w, group_by_length=grouped), 2)
        for w in (0, 2)
    }
    good = {r.record["id"] for s in find_shards(spec) for r in read_shard(s) if isinstance(r.record, dict)}
    good = (good | GOOD_EXTRA) - set(BAD)
    assert len(good) == 53
    for epoch in runs[0]:
        assert len(epoch) == 14  # 56 records / 4
        ids = [i for b in epoch for i in _ids(b)]
        assert sorted(ids) == sorted(good)  # every usable record once, the 3 bad ones dropped
    assert [_ids(b) for b in runs[0][0]] != [_ids(b) for b in runs[0][1]]  # each epoch its own order
    for a, b in zip(sum(runs[0], []), sum(runs[2], [])):  # the batches do not depend on the workers
        assert _ids(a) == _ids(b) and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    # a restart mid-epoch (a resume) reads on from there: the same batches as the uninterrupted stream
    data = _stage(tiny_vlm.processor, spec, num_workers=2, group_by_length=grouped)
    resumed = [data.next_batch(1, 5 + i)[0] for i in range(6)]
    data.close()
    assert [_ids(b) for b in resumed] == [_ids(b) for b in runs[0][1][5:11]]


def test_length_groups_over_a_stream_sort_each_mega_batch_by_estimated_length(tiny_vlm, corpus):
    data = _stage(
        tiny_vlm.processor, str(corpus / "wds" / "*.tar"), group_by_length=True, length_group_mult=2
    )
    stream = data.train.batches(data, BatchAssembler(data.collate), (0, 0))
    records = list(data.train.plan(0, 0, 1).raw(0))[:16]
    order = stream.block_order(records, torch.Generator().manual_seed(0))
    lengths = [data.train.encode.length(records[i]) for i in order]
    assert sorted(order) == list(range(16)) and len(set(lengths)) > 1
    for start in (0, 8):  # mega-batches of 2 batches of 4, longest first (their heads may swap: HF's recipe)
        mega = lengths[start + 1 : start + 8]
        assert mega == sorted(mega, reverse=True)
    assert lengths[0] == max(lengths)


def test_bad_records_in_shards_are_skipped_and_counted_with_their_reason(tiny_vlm, corpus):
    data = _stage(tiny_vlm.processor, str(corpus / "wds" / "*.tar"), batch_size=1)
    epoch = _epochs(data, 1)[0]
    report = data.train.report
    assert report.total == 56 and report.ok == 53
    assert dict(report.rejected) == Counter(BAD.values())
    assert {report.examples[reason] for reason in BAD.values()} == {
        "corrupt-image",
        "extra.tar/broken",
        "silent",
    }
    # a batch whose one record is bad takes the epoch's next usable record instead of being empty
    assert len(epoch) == 56 and all(len(_ids(b)) == 1 for b in epoch)
    ids = Counter(i for b in epoch for i in _ids(b))
    assert len(ids) == 53 and sum(ids.values()) == 56 and not set(ids) & set(BAD)


def test_too_many_bad_records_stop_training(tiny_vlm, corpus):
    data = _stage(tiny_vlm.processor, str(corpus / "wds" / "*.tar"), max_bad=0.05)  # 3 / 56 = 5.4%
    with pytest.raises(DataQualityError, match="malformed_json"):  # at the epoch end
        _epochs(data, 1)
    data = _stage(tiny_vlm.processor, str(corpus / "wds" / "*.tar"), max_bad=0.01)
    data.train.min_check = 8  # past this many records, after every batch
    fetched, epoch, pos = 0, 0, 0
    with pytest.raises(DataQualityError, match="rejected"):
        while True:
            _, epoch, pos = data.next_batch(epoch, pos)
            fetched += 1
    data.close()
    assert fetched < data.steps_per_epoch - 1


def _opened(monkeypatch) -> list[tuple[str, int]]:
    """(shard name, records skipped) for every shard the stream opens from now on."""
    opened: list[tuple[str, int]] = []
    real = stream_module.read_shard

    def recording(shard, skip=0):
        opened.append((shard.name, skip))
        return real(shard, skip)

    monkeypatch.setattr(stream_module, "read_shard", recording)
    return opened


def test_ranks_split_the_records_of_an_epoch_without_overlap(corpus, monkeypatch):
    shards = find_shards(str(corpus / "wds" / "*.tar"))  # 7 shards: 10, 10, 10, 10, 10, 1, 5 records
    for epoch in range(2):
        keys, opened = [], []
        for rank in range(3):
            seen = _opened(monkeypatch)
            keys.append([r.key for r in ShardPlan(shards, 0, rank, 3, 8).ordered(epoch)])
            opened.append({name for name, _ in seen})
        assert [len(k) for k in keys] == [18, 18, 18]  # 56 // 3 each, 2 left out this epoch
        assert len(set(sum(keys, []))) == 54
        assert all(len(names) <= 4 for names in opened)  # each rank opens the shards of its share only
        assert set.union(*opened) == {s.name for s in shards}


def test_a_restart_skips_whole_shards_and_a_worker_decodes_only_its_batches(tiny_vlm, corpus, monkeypatch):
    data = _stage(tiny_vlm.processor, str(corpus / "wds" / "*.tar"))  # 4 records a batch, blocks of 8
    plan = data.train.plan(0, 0, 1)
    expected = [r.key for r in plan.ordered(1, 44)]  # epoch 1 from batch 11 (record 44) on
    opened = _opened(monkeypatch)
    decoded: list[str] = []
    encode = RecordEncoder.__call__
    monkeypatch.setattr(
        RecordEncoder, "__call__", lambda self, raw: decoded.append(raw.key) or encode(self, raw)
    )
    monkeypatch.setattr(loader_module, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    stream = iter(data.train.batches(data, BatchAssembler(data.collate), (1, 10)))
    batches = [next(stream) for _ in range(2)]
    assert [b[POSITION_KEY] for b in batches] == [(1, 11), (1, 13)]  # worker 1 of 2: every other batch
    assert decoded == expected[0:4] + expected[8:12]  # the records of those two batches, nothing else
    at, first = 0, []
    for shard in plan.shard_order(1):  # the block of batch 10 starts at record 40: shards before it unread
        if at + shard.count > 40:
            first.append((shard.name, max(0, 40 - at)))
        at += shard.count
    assert opened == first[: len(opened)] and opened[0] == first[0]


def test_sharded_training_data_refuses_what_a_stream_cannot_do(tiny_vlm, corpus, tmp_path):
    cfg = DataConfig(max_length=128)
    spec = str(corpus / "wds")
    with pytest.raises(ValueError, match="tasks"):
        ShardSource.build(cfg, spec, tiny_vlm.processor, StageConfig(name="align", tasks=["caption"]))
    cfg.merge_turns = True
    with pytest.raises(ValueError, match="merge_turns"):
        ShardSource.build(cfg, spec, tiny_vlm.processor, StageConfig())
    assert (
        is_sharded(spec) and is_sharded(spec + "/*.tar") and not is_sharded(str(corpus / "data" / "val.json"))
    )
    recipe = load_config(RecipeConfig, TINY, [f"data.train={spec}", "train.feature_cache=true"])
    model = VisionLanguageModel.from_config(recipe.model)
    apply_stage(model, StageConfig(preset="align"))  # a frozen tower: JSON data would get the cache
    data = StageData.build(recipe, StageConfig(batch_size=4), model, tmp_path, build_strategy("single"))
    assert data.streamed and data.feature_cache is None and data.num_samples == 51


def test_validation_shards_are_read_whole_like_the_json_split(tiny_vlm, corpus):
    cfg = DataConfig(max_length=128)
    from_shards = VLMDataset.from_config(cfg, corpus / "val", tiny_vlm.processor)
    from_json = VLMDataset.from_config(cfg, corpus / "data" / "val.json", tiny_vlm.processor)
    assert len(from_shards) == len(from_json) == 6
    for a, b in zip(from_shards, from_json):
        assert a["id"] == b["id"] and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])


# ------------------------------------------------------------------------------------------------ torchrun
RANK_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from vlmkit.config import DataConfig, RecipeConfig, StageConfig, load_config
from vlmkit.data.collate import Collator
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.data import ShardSource, StageData

spec, tiny, out = sys.argv[1:4]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
processor = VisionLanguageModel.from_config(load_config(RecipeConfig, tiny).model).processor
source = ShardSource.build(DataConfig(max_length=128, shuffle_buffer=8), spec, processor, StageConfig())
data = StageData(source, None, Collator(processor.tokenizer.pad_token_id), 4, 0, False, rank=rank,
                 world=world, num_workers=2)
seen, epoch, pos = [[], []], 0, 0
for _ in range(2 * data.steps_per_epoch):
    batch, epoch, pos = data.next_batch(epoch, pos)
    seen[epoch].append(batch["sample_ids"])
data.close()
mine = {"seen": seen, "rejected": dict(source.report.rejected), "total": source.report.total}
everyone = [None] * world
dist.all_gather_object(everyone, mine)
if rank == 0:
    with open(out, "w") as f:
        json.dump(everyone, f)
dist.destroy_process_group()
"""


@pytest.mark.dist
def test_two_ranks_with_two_workers_each_see_every_record_once_per_epoch(corpus, tmp_path):
    script, out = tmp_path / "ranks.py", tmp_path / "seen.json"
    script.write_text(RANK_SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(corpus / "wds" / "*.tar"),
        TINY,
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    for epoch in range(2):
        per_rank = [[i for batch in r["seen"][epoch] for i in batch] for r in ranks]
        assert [len(r["seen"][epoch]) for r in ranks] == [7, 7]  # 28 records each: 7 batches of 4
        assert not set(per_rank[0]) & set(per_rank[1])
        everything = per_rank[0] + per_rank[1]
        assert len(everything) == len(set(everything)) == 53  # 56 records, the 3 bad ones skipped
        assert not set(everything) & set(BAD)
    rejected = Counter()
    for r in ranks:
        rejected.update(r["rejected"])
    assert rejected == Counter({reason: 2 for reason in BAD.values()})  # each once per epoch, on one rank
    assert sum(r["total"] for r in ranks) == 112


# ------------------------------------------------------------------------------------------------ resume
def _args(corpus: Path) -> list[str]:
    stage = (
        "stages=[{name: instruct, preset: instruct, lora: {r: 8, alpha: 16, dropout: 0.0,"
        " target_modules: [q_proj, v_proj]}, lr: 1.0e-3, max_steps: 10, batch_size: 8}]"
    )
    return [
        "--set",
        stage,
        f"data.train={corpus / 'wds' / '*.tar'}",
        f"data.val={corpus / 'val'}",
        "data.max_bad=0.1",
        "data.shuffle_buffer=8",
        "train.num_workers=2",
        "train.save_every=3",
        "train.keep_last=1",
        "train.plot=false",
    ]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def test_sigkill_and_resume_on_sharded_data_reproduce_the_uninterrupted_losses(corpus, tmp_path):
    """10 steps of 8 records (7 an epoch); killed after the checkpoint of step 6 (mid-epoch 0) or 9 (mid-epoch 1)."""
    ref = tmp_path / "ref"
    assert main(["train", TINY, "--out", str(ref), *_args(corpus)]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vlmkit.cli", "train", TINY, "--out", str(out), *_args(corpus)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            latest = latest_checkpoint(out / "checkpoints")
            if latest is not None and int(latest.name.split("-")[1]) >= 6:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    state = json.loads((latest_checkpoint(out / "checkpoints") / "trainer_state.json").read_text())
    assert 6 <= state["step"] < 10 and state["batch_pos"] > 0  # resumed mid-epoch
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing from" in resumed.stderr
    want, got = _losses(ref), _losses(out)
    assert sorted(got) == sorted(want) == list(range(1, 11))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert any("val_loss" in r for r in read_metrics(out / "metrics.jsonl"))  # validated on parquet shards
