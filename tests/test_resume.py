"""Exact resume at every moment: SIGKILL at a named point (`VLMKIT_KILL_AT`), then `--resume` must give the
uninterrupted run's losses, step numbers, validation lines and final weights; damaged checkpoints and a full
disk are reported and survived.

Each run is a separate process (`vlmkit train` through the CLI's `main`), forked from a forkserver that imported
vlmkit once, so a kill is a real SIGKILL without paying the imports every time. One thread per run: the runs
of this file are compared with each other bit for bit."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.train.checkpoint import latest_checkpoint, verify_checkpoint
from vlmkit.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUICK = str(ROOT / "configs" / "quickstart-tiny.yaml")
# configs/tiny.yaml made smaller: 5 + 5 steps (global steps 1-5 align, 6-10 instruct with LoRA), checkpoints
# at stage steps 2 and 4 (global 2, 4 and 7, 9), validation at stage step 3 and at each stage's end
SMALL = [
    "stages.0.max_steps=5",
    "stages.1.max_steps=5",
    "train.save_every=2",
    "train.keep_last=2",
    "train.eval_every=3",
    "train.val_batches=1",
    "train.plot=false",
    "data.synthetic.n_train=16",
    "data.synthetic.n_val=8",
    "data.synthetic.n_test=2",
]
# the tiny quickstart: tower pretraining (3 steps), then align and instruct (3 steps each) on cached features
QUICK_SMALL = [
    "train.plot=false",
    "data.synthetic.n_test=2",
    "pretrain_vision.batch_size=8",
    "pretrain_vision.threads=1",
    "pretrain_vision.save_every=1",  # checkpoints of the tower pretraining after steps 1 and 2 (of 3)
]
PRELOAD = ["vlmkit.cli", "vlmkit.train.trainer", "vlmkit.train.data", "vlmkit.shapesworld.world", "peft"]


# ------------------------------------------------------------------------------------------------ runs
def _child(argv: list[str], kill_at: str, log: str, enospc: str) -> None:
    """A `vlmkit` command in a forked process: output to `log`, `VLMKIT_KILL_AT=kill_at`, one thread;
    `enospc` ("WRITER:N") makes the N-th call of that checkpoint writer fail as on a full disk."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.pop("VLMKIT_KILL_AT", None)
    os.environ["COLUMNS"] = "1000"  # log lines unwrapped, so that the tests can find what they say
    if kill_at:
        os.environ["VLMKIT_KILL_AT"] = kill_at
    torch.set_num_threads(1)
    if enospc:
        _fill_disk(*enospc.split(":"))
    from vlmkit.cli import main

    sys.exit(main(argv))


def _fill_disk(writer: str, nth: str) -> None:
    """Make the nth call of the checkpoint's `torch.save` / `save_file` fail the way a full disk makes it fail."""
    import errno

    import vlmkit.train.checkpoint as ckpt

    calls = {"n": 0}
    real = getattr(ckpt, writer) if writer == "save_file" else ckpt.torch.save

    def failing(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(nth):
            with open(path, "wb") as f:  # a partial file, as the writer leaves it
                f.write(b"\0" * 100)
            if writer == "save_file":
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(obj, path, *args, **kwargs)

    if writer == "save_file":
        ckpt.save_file = failing
    else:
        ckpt.torch.save = failing


_CONTEXT: list = []


def _context():
    if not _CONTEXT:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _CONTEXT.append(ctx)
    return _CONTEXT[0]


def train(
    out: Path,
    *,
    resume: bool = False,
    kill_at: str = "",
    config: str = TINY,
    overrides: list[str] = SMALL,
    enospc: str = "",
) -> tuple[int, str]:
    """Run `vlmkit train CONFIG --out OUT [--resume] --set ...` in a forked process: (exit code, its output)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.{len(list(out.parent.glob(out.name + '.*.log')))}.log"
    argv = ["train", config, "--out", str(out), *(["--resume"] if resume else []), "--set", *overrides]
    return cli(argv, log, kill_at, enospc)


def cli(argv: list[str], log: Path, kill_at: str = "", enospc: str = "") -> tuple[int, str]:
    """Run `vlmkit ARGV` in a forked process with output to `log`: (exit code, its output)."""
    proc = _context().Process(target=_child, args=(argv, kill_at, str(log), enospc))
    proc.start()
    proc.join(timeout=600)
    if proc.is_alive():  # pragma: no cover - a hung run
        proc.kill()
        proc.join()
    return proc.exitcode, log.read_text()


def killed(out: Path, kill_at: str, **kwargs) -> None:
    code, text = train(out, kill_at=kill_at, **kwargs)
    assert code == -signal.SIGKILL, f"{kill_at} was not reached (exit code {code}):\n{text[-3000:]}"


def resumed(out: Path, **kwargs) -> str:
    code, text = train(out, resume=True, **kwargs)
    assert code == 0, text[-3000:]
    return text


# ------------------------------------------------------------------------------------------- compare
def _rows(run: Path) -> tuple[list[dict], list[dict]]:
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows if "loss" in r]
    return train_rows, [r for r in rows if "val_loss" in r]


def assert_same_run(run: Path, ref: Path) -> None:
    """Per-step losses (<= 1e-6), step numbers, validation lines, and every saved model bit for bit."""
    (got, got_val), (want, want_val) = _rows(run), _rows(ref)
    key = ("step", "stage", "stage_step", "epoch", "tokens", "samples")
    assert [[r[k] for k in key] for r in got] == [[r[k] for k in key] for r in want]  # once each, in order
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-6), g["step"]
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-9), g["step"]
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4, abs=1e-6), g["step"]
    assert [(r["step"], r["stage"]) for r in got_val] == [(r["step"], r["stage"]) for r in want_val]
    for g, w in zip(got_val, want_val):
        assert g["val_loss"] == pytest.approx(w["val_loss"], abs=1e-6), g["step"]
    models = sorted(p.relative_to(ref) for p in ref.glob("**/model.safetensors"))
    assert models and sorted(p.relative_to(run) for p in run.glob("**/model.safetensors")) == models
    for name in models:
        a, b = load_file(str(run / name)), load_file(str(ref / name))
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k}"
    leftovers = [p for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers, leftovers
    assert not (run / "checkpoints").exists()  # removed once the stage that wrote them is done


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run of the small tiny recipe (shared by every test below)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, text = train(out)
    assert code == 0, text[-3000:]
    steps = [r["step"] for r in _rows(out)[0]]
    assert steps == list(range(1, 11))
    assert [(r["step"], r["stage"]) for r in _rows(out)[1]] == [
        (3, "align"),
        (5, "align"),
        (8, "instruct"),
        (10, "instruct"),
    ]
    return out


# (kill point, what the resumed run must say it did)
MOMENTS = {
    # stage 0 before its first checkpoint: starts again, the killed run's lines dropped (no duplicates)
    "align-before-first-checkpoint": ("train_step:2", "starting it from the beginning"),
    # after step 3's validation line, one step past the checkpoint of step 2
    "align-after-a-validation-line": ("step_done:3", "continuing from"),
    # mid-step (after backward, before the optimizer step) once a checkpoint exists
    "align-mid-step": ("train_step:5", "step-4"),
    # inside the checkpoint writer: weights written, optimizer not yet (a temp dir is left)
    "checkpoint-write": ("checkpoint_write:2", "step-2"),
    # checkpoint renamed into place, `latest` pointer not moved yet
    "checkpoint-commit": ("checkpoint_commit:2", "step-4"),
    # stage 0's last validation written, its model not saved
    "align-end-before-save": ("stage_validated:1", "step-4"),
    # inside stage 0's model save (weights written to the temp dir, not renamed)
    "align-model-save": ("model_save:1", "step-4"),
    # stage 0 saved, its checkpoints not yet removed: they must not be resumed from
    "align-saved-before-cleanup": ("stage_saved:1", "ignoring"),
    # between the stages: stage 1 not started (its LoRA not initialised)
    "between-stages": ("stage_start:2", "after stage 0, at step 5"),
    # stage 1 before its first checkpoint: numbered from the end of stage 0
    "instruct-before-first-checkpoint": ("train_step:7", "after stage 0, at step 5"),
    # stage 1 after its first checkpoint (LoRA adapters in the checkpoint)
    "instruct-after-a-checkpoint": ("step_done:8", "step-7"),
    # inside the final model save (the last stage's model is saved)
    "final-model-save": ("model_save:3", "writing the final model"),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigkill_at_any_moment_then_resume_reproduces_the_uninterrupted_run(reference, tmp_path, moment):
    kill_at, says = MOMENTS[moment]
    out = tmp_path / "run"
    killed(out, kill_at)
    text = resumed(out)
    assert says in text, text[-3000:]
    assert_same_run(out, reference)


def test_resume_of_a_finished_run_says_so_and_changes_nothing(reference, tmp_path):
    out = shutil.copytree(reference, tmp_path / "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    text = resumed(out)
    assert "is complete" in text
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def two_checkpoints(reference, tmp_path_factory) -> Path:
    """A run killed mid-step 5: checkpoints step-2 and step-4 of stage 0 on disk."""
    out = tmp_path_factory.mktemp("damaged") / "run"
    killed(out, "train_step:5")
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-2", "step-4"]
    return out


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# how the newest checkpoint is damaged -> what the warning must name
DAMAGE = {
    "cut-weights": (lambda c: _cut(c / "trainable.safetensors"), "trainable.safetensors is"),
    "corrupt-optimizer": (lambda c: _flip(c / "optim.pt"), "optim.pt does not match its sha256"),
    "bad-trainer-state": (lambda c: (c / "trainer_state.json").write_text("{"), "trainer_state.json is"),
    "missing-file": (lambda c: (c / "optim.pt").unlink(), "optim.pt is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    reference, two_checkpoints, tmp_path, damage
):
    spoil, names = DAMAGE[damage]
    out = shutil.copytree(two_checkpoints, tmp_path / "run")
    spoil(out / "checkpoints" / "step-4")
    assert verify_checkpoint(out / "checkpoints" / "step-4") is not None
    text = resumed(out)
    assert "step-4" in text and names in text, text[-3000:]  # the warning names the checkpoint and the file
    assert "continuing from" in text and "step-2" in text
    assert_same_run(out, reference)


def test_when_no_checkpoint_verifies_the_stage_starts_again(reference, two_checkpoints, tmp_path):
    out = shutil.copytree(two_checkpoints, tmp_path / "run")
    _cut(out / "checkpoints" / "step-4" / "optim.pt")
    (out / "checkpoints" / "step-2" / "manifest.json").write_text("not json")
    text = resumed(out)
    assert "manifest.json is unreadable" in text and "starting it from the beginning" in text, text[-3000:]
    assert_same_run(out, reference)


# ------------------------------------------------------------------------------------------ full disk
@pytest.mark.parametrize(
    "writer", ["torch.save", "save_file"], ids=["optimizer-zip-writer", "weights-safetensors"]
)
def test_a_full_disk_during_a_checkpoint_is_reported_and_the_previous_one_kept(reference, tmp_path, writer):
    out = tmp_path / "run"
    code, text = train(out, enospc=f"{writer}:2")  # the second checkpoint (step 4) hits a full disk
    assert code == 1, text[-3000:]
    assert "no space left on device" in text and "bytes" in text, text[-3000:]
    assert str(out / "checkpoints" / "step-4") in text and "Traceback" not in text
    ckpts = out / "checkpoints"
    assert [p.name for p in ckpts.iterdir() if p.name.startswith(".")] == []  # no temp dir left
    assert latest_checkpoint(ckpts).name == "step-2" and verify_checkpoint(ckpts / "step-2") is None
    resumed(out)
    assert_same_run(out, reference)


# ------------------------------------------------------------------ tower pretraining, feature cache
@pytest.fixture(scope="module")
def quick_reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the tiny quickstart recipe (tower pretraining + feature cache)."""
    out = tmp_path_factory.mktemp("quick-reference") / "run"
    code, text = train(out, config=QUICK, overrides=QUICK_SMALL)
    assert code == 0, text[-3000:]
    assert (out / "vision-pretrain" / "vision.safetensors").is_file()
    assert list((out / "feature_cache").glob("*/shard-*.safetensors"))
    return out


QUICK_MOMENTS = {
    "tower-pretraining-step": "pretrain_step:2",  # after the checkpoint of step 2: resumed from it
    "tower-pretraining-save": "pretrain_save:1",  # tower saved, text encoder not: resumed from step 2
    "feature-cache-precompute": "feature_cache_batch:1",
    "feature-cache-shard-written": "feature_cache_shard:1",
}


@pytest.mark.parametrize("moment", list(QUICK_MOMENTS))
def test_sigkill_in_tower_pretraining_or_feature_cache_then_resume(quick_reference, tmp_path, moment):
    out = tmp_path / "run"
    killed(out, QUICK_MOMENTS[moment], config=QUICK, overrides=QUICK_SMALL)
    text = resumed(out, config=QUICK, overrides=QUICK_SMALL)
    if moment.startswith("tower"):  # continued from its checkpoint, not pretrained again from the start
        assert "continuing the vision_pretrain objective from" in text and "step-2" in text, text[-3000:]
    assert not (out / "vision-pretrain" / "checkpoints").exists()
    assert_same_run(out, quick_reference)
    tower = load_file(str(out / "vision-pretrain" / "vision.safetensors"))
    want = load_file(str(quick_reference / "vision-pretrain" / "vision.safetensors"))
    assert all(torch.equal(tower[k], want[k]) for k in want)


# ------------------------------------------------------------- `vlmkit pretrain-vision` on its own
@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    from vlmkit.shapesworld.world import generate_shapesworld

    out = tmp_path_factory.mktemp("pairs")
    return str(generate_shapesworld(out, 0, seed=3, image_size=32, splits={"train": 24})["train"])


def pretrain(pairs: str, out: Path, *, resume: bool = False, kill_at: str = "") -> tuple[int, str]:
    """6 steps of contrastive + dense pretraining of a tiny tower, checkpoints after steps 2 and 4."""
    tiny = ["image_size=32", "vit.dim=32", "vit.depth=1", "vit.heads=2", "text.dim=32", "text.depth=1"]
    argv = ["pretrain-vision", pairs, "--out", str(out), "--steps", "6", "--no-progress"]
    argv += [*(["--resume"] if resume else []), "--set", *tiny, "embed_dim=32", "batch_size=8"]
    argv += ["save_every=2", "threads=1"]
    out.parent.mkdir(parents=True, exist_ok=True)
    return cli(
        argv, out.parent / f"{out.name}.{len(list(out.parent.glob(out.name + '.*.log')))}.log", kill_at
    )


PRETRAIN_MOMENTS = {  # kill point -> the checkpoint the resumed run continues from
    "after-a-step": ("pretrain_step:5", "step-4"),
    "inside-a-checkpoint-write": ("checkpoint_write:2", "step-2"),
    "inside-the-final-save": ("pretrain_save:1", "step-4"),
}


@pytest.fixture(scope="module")
def pretrain_reference(pairs, tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("pretrain-reference") / "out"
    code, text = pretrain(pairs, ref)
    assert code == 0, text[-3000:]
    return ref


@pytest.mark.parametrize("moment", list(PRETRAIN_MOMENTS))
def test_sigkill_in_pretrain_vision_then_resume_gives_the_same_tower(
    pairs, pretrain_reference, tmp_path, moment
):
    ref = pretrain_reference
    out = tmp_path / "run"
    kill_at, step = PRETRAIN_MOMENTS[moment]
    code, text = pretrain(pairs, out, kill_at=kill_at)
    assert code == -signal.SIGKILL, f"{kill_at} was not reached (exit code {code}):\n{text[-3000:]}"
    code, text = pretrain(pairs, out, resume=True)
    assert code == 0, text[-3000:]
    assert f"continuing the vision_pretrain objective from {out / 'checkpoints' / step}" in text, text[-3000:]
    for name in ("vision.safetensors", "text_encoder.safetensors", "detection_head.safetensors"):
        got, want = load_file(str(out / name)), load_file(str(ref / name))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in ref.iterdir()
    )  # no checkpoints left
