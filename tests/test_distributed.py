"""DDP and FSDP2 under torchrun (2 CPU ranks, gloo): losses match one process, FSDP2 checkpoints resume exactly."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlmkit.cli import main
from vlmkit.config import RecipeConfig, load_config
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.checkpoint import latest_checkpoint
from vlmkit.train.metrics import read_metrics
from vlmkit.train.stages import apply_stage

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
RANKS = 2
LORA = "{r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}"


def _overrides(grad_accum: int, strategy: str) -> list[str]:
    """Two stages (align: bridge; instruct: bridge + LoRA), 2 + 4 optimizer steps of 16 samples each.

    One process accumulates 4 micro-batches of 4; two ranks accumulate 2 of 4 each: every micro-batch of the
    single process is exactly one rank's slice of a multi-process micro-batch.
    """
    stages = (
        "stages=["
        f"{{name: align, preset: align, tasks: [caption], lr: 2.0e-3, max_steps: 2, batch_size: 4,"
        f" grad_accum: {grad_accum}}},"
        f" {{name: instruct, preset: instruct, lora: {LORA}, lr: 1.0e-3, max_steps: 4, batch_size: 4,"
        f" grad_accum: {grad_accum}}}]"
    )
    return [
        stages,
        f"train.strategy={strategy}",
        "train.save_every=2",
        "train.keep_last=1",
        "train.plot=false",
        "data.synthetic.n_val=4",
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def _torchrun(out: Path, strategy: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free local port: parallel test sessions do not collide
        "--nproc_per_node",
        str(RANKS),
        "-m",
        "vlmkit.cli",
        "train",
        TINY,
        "--out",
        str(out),
        *extra,
        "--set",
        *_overrides(2, strategy),
    ]


def _train(out: Path, strategy: str, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _torchrun(out, strategy, *extra), capture_output=True, text=True, env=_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(run: Path) -> list[dict]:
    return read_metrics(run / "metrics.jsonl")


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(run) if "loss" in r}


def _assert_same_losses(run: Path, ref: Path) -> None:
    got, want = _losses(run), _losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, 7))  # each step logged once, none lost or repeated
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-4), step


def _assert_same_validation(run: Path, ref: Path) -> None:
    """Validation is token-weighted over the ranks' shards; the align split (4 records) splits evenly."""
    got = {r["stage"]: r["val_loss"] for r in _rows(run) if "val_loss" in r}
    want = {r["stage"]: r["val_loss"] for r in _rows(ref) if "val_loss" in r}
    assert got["align"] == pytest.approx(want["align"], abs=1e-4)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", TINY, "--out", str(out), "--set", *_overrides(4, "single")]) == 0
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    _train(out, "ddp")
    return out


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (torchrun starts its workers in sessions of their own: they outlive the agent)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_after_checkpoint(out: Path, step: int) -> None:
    """Start a 2-rank FSDP run; SIGKILL torchrun and its workers once checkpoint `step` is complete.

    Backstop against a slow poll: a file where stage 1 saves its model makes that stage fail at its end, so
    the run can never get past the mid-stage checkpoint (and its cleanup) whatever the timing.
    """
    (out / "stages").mkdir(parents=True)
    (out / "stages" / "1-instruct").write_text("blocks the end of stage 1")
    proc = subprocess.Popen(
        _torchrun(out, "fsdp"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env()
    )
    marker = out / "checkpoints" / f"step-{step}" / "trainer_state.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and not marker.is_file():
            time.sleep(0.005)
    finally:
        victims = [*_descendants(proc.pid), proc.pid] if proc.poll() is None else []
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        gone_by = time.time() + 30
        while any(_alive(pid) for pid in victims[:-1]) and time.time() < gone_by:  # workers, reparented
            time.sleep(0.05)
    assert marker.is_file(), err[-3000:].decode(errors="replace")
    (out / "stages" / "1-instruct").unlink()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """An FSDP run killed after the checkpoint of global step 4 (step 2 of the LoRA stage), then resumed
    under FSDP: (run directory, a copy of the checkpoint it resumed from, stderr of the resume)."""
    root = tmp_path_factory.mktemp("fsdp")
    out = root / "run"
    _kill_after_checkpoint(out, 4)
    assert not (out / "model").exists()
    ckpt = shutil.copytree(latest_checkpoint(out / "checkpoints"), root / "checkpoint")
    proc = _train(out, "fsdp", "--resume")
    return out, ckpt, proc.stderr


@pytest.mark.dist
def test_ddp_losses_match_one_process_with_the_same_global_batch(single_run, ddp_run) -> None:
    _assert_same_losses(ddp_run, single_run)
    _assert_same_validation(ddp_run, single_run)
    # stage 1 was LoRA: merged into the saved model, which holds no adapter weights
    assert not any("lora" in n for n in load_file(str(ddp_run / "model" / "model.safetensors")))


@pytest.mark.dist
def test_fsdp_losses_match_one_process_across_a_kill_and_resume(single_run, fsdp_run) -> None:
    run, _, stderr = fsdp_run
    assert "continuing from" in stderr
    _assert_same_losses(run, single_run)  # steps 1-4 before the kill, 5-6 recomputed after the resume
    _assert_same_validation(run, single_run)


@pytest.mark.dist
def test_fsdp_checkpoint_holds_full_weights_and_optimizer_state(fsdp_run) -> None:
    _, ckpt, _ = fsdp_run
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["stage"] == "instruct"
    recipe = load_config(RecipeConfig, TINY, _overrides(2, "fsdp"))
    model = VisionLanguageModel.from_config(recipe.model)
    apply_stage(model, recipe.stages[1])
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    # full (unsharded) tensors of every trainable parameter, under the plain model's names
    weights = load_file(str(ckpt / "trainable.safetensors"))
    assert {n: tuple(t.shape) for n, t in weights.items()} == shapes
    assert any("lora_A" in n for n in weights) and any(n.startswith("bridge.") for n in weights)
    # the optimizer state in the single-process (index-keyed) format, full-size moments
    optim = torch.load(ckpt / "optim.pt", weights_only=False)["optimizer"]
    order = [i for group in optim["param_groups"] for i in group["params"]]
    assert order == list(range(len(shapes))) and sorted(optim["state"]) == order
    moments = sorted(tuple(s["exp_avg"].shape) for s in optim["state"].values())
    assert moments == sorted(shapes.values())
    assert all(float(s["step"]) == 2 for s in optim["state"].values())


def _logits(model_dir: Path) -> torch.Tensor:
    model = VisionLanguageModel.from_pretrained(model_dir)
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    batch = model.prepare_prompts([f"{model.llm.image_token} What is in the picture?"], [[image]])
    with torch.no_grad():
        return model(**batch).logits  # [1, T, V]


@pytest.mark.dist
def test_the_model_saved_under_fsdp_loads_and_matches_ddp(single_run, ddp_run, fsdp_run) -> None:
    run, _, _ = fsdp_run
    fsdp = _logits(run / "model")
    torch.testing.assert_close(fsdp, _logits(ddp_run / "model"), atol=1e-4, rtol=0)
    torch.testing.assert_close(fsdp, _logits(single_run / "model"), atol=1e-4, rtol=0)
    assert not any("lora" in n for n in load_file(str(run / "model" / "model.safetensors")))
    # the stage-0 model, gathered from the shards and saved between stages, is the one stage 1 trained on
    align = VisionLanguageModel.from_pretrained(run / "stages" / "0-align" / "model")
    single_align = VisionLanguageModel.from_pretrained(single_run / "stages" / "0-align" / "model")
    for (name, a), (_, b) in zip(align.state_dict().items(), single_align.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


def test_validation_shards_give_every_rank_the_same_number_of_batches() -> None:
    from vlmkit.train.data import StageData

    shards = []
    for rank in range(RANKS):
        data = StageData(None, list(range(5)), None, 2, 0, False, rank=rank, world=RANKS)
        data._collate = lambda items: items  # the sample indices themselves
        shards.append(data.val_batches())
    # a rank with fewer batches would leave the others waiting in a sharded forward
    assert [len(s) for s in shards] == [2, 2]
    assert sorted({i for s in shards for batch in s for i in batch}) == [0, 1, 2, 3, 4]


def test_a_multi_process_strategy_outside_torchrun_fails_clearly(monkeypatch) -> None:
    from vlmkit.train.strategies import build_strategy

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        build_strategy("fsdp")
