"""Training engine: the tiny recipe end to end, stages as data, strict config, atomic checkpoints (kills and
`--resume`: test_resume.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from vlmkit.cli import main
from vlmkit.config import LoRAConfig, RecipeConfig, StageConfig, load_config
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.checkpoint import latest_checkpoint
from vlmkit.train.metrics import read_metrics
from vlmkit.train.stages import apply_stage

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted run of configs/tiny.yaml (shared by the tests below)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", TINY, "--out", str(out)]) == 0
    return out


def test_forward_keeps_its_visual_tokens_rms_for_the_step_logs():
    """The trainer's `visual_rms_ratio` reads the RMS the forward pass took of the tokens it merged (no second
    pass): it equals the RMS of the bridge's output, also under bf16 autocast."""
    from conftest import random_image, tiny_model_config

    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_model_config()).eval()
    batch = model.prepare_prompts(
        ["<image>\nWhat is it?", "<image>\nAnd this?"], [[random_image(0)], [random_image(1)]]
    )
    with torch.no_grad():
        model(**batch)
        expected = model.encode_images(batch["pixel_values"]).float().pow(2).mean().sqrt()
        assert torch.allclose(model.visual_rms, expected, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch)
            tokens = model.encode_images(batch["pixel_values"])
        assert torch.allclose(model.visual_rms, tokens.float().pow(2).mean().sqrt(), rtol=1e-4)
    model.visual_rms = None
    text = model.prepare_prompts(["no image here"], [[]])
    with torch.no_grad():
        model(**text)
    assert model.visual_rms is None  # a step without images logs no ratio


def test_tiny_recipe_runs_and_writes_the_run_directory(reference_run):
    rows = [r for r in read_metrics(reference_run / "metrics.jsonl") if "loss" in r]
    recipe = load_config(RecipeConfig, TINY)
    assert [r["step"] for r in rows] == list(range(1, 21))  # >= 20 optimizer steps, one line each
    assert recipe.train.save_every <= 5
    assert {r["stage"] for r in rows} == {"align", "instruct"}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert any("val_loss" in r for r in read_metrics(reference_run / "metrics.jsonl"))
    # every step logs its visual tokens' RMS against the word embeddings'; every validation how the LLM's
    # layers transform them (one cosine per layer, for visual and for text tokens)
    assert all(r["visual_rms_ratio"] > 0 for r in rows)
    stats = [r for r in read_metrics(reference_run / "metrics.jsonl") if "val_visual_cos" in r]
    layers = 2  # the tiny LLM's
    assert len(stats) == 2 and all(
        len(r["val_visual_cos"]) == len(r["val_text_cos"]) == layers for r in stats
    )
    assert all(-1 <= c <= 1 for r in stats for c in r["val_visual_cos"])
    for name in (
        "config.yaml",
        "training.png",
        "model/config.json",
        "stages/0-align/model/model.safetensors",
    ):
        assert (reference_run / name).is_file(), name
    model = VisionLanguageModel.from_pretrained(reference_run / "model")
    assert not any("lora" in n for n, _ in model.named_parameters())  # LoRA merged into the saved model
    # align changed only the bridge: the saved stage-0 tower equals a fresh build with the same seed
    align = VisionLanguageModel.from_pretrained(reference_run / "stages/0-align/model")
    torch.manual_seed(recipe.train.seed)
    fresh = VisionLanguageModel.from_config(recipe.model)
    assert torch.equal(align.vision.pos, fresh.vision.pos)
    assert not torch.equal(align.bridge.mlp[0].weight, fresh.bridge.mlp[0].weight)


def test_training_reduces_loss_on_a_small_set(tmp_path):
    out = tmp_path / "fit"
    main(
        [
            "train",
            TINY,
            "--out",
            str(out),
            "--set",
            "stages=[{name: fit, preset: full, lr: 3.0e-3, max_steps: 25,"
            " batch_size: 8, tasks: [counting], warmup_ratio: 0.0}]",
            "data.synthetic.n_train=8",
            "train.plot=false",
        ]
    )
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def test_half_written_checkpoints_are_never_used(tmp_path):
    from vlmkit.train.checkpoint import save_checkpoint

    root = tmp_path / "checkpoints"
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(root, 5, model, opt, sched, {"stage_index": 0})
    (root / ".step-10.tmp-99").mkdir()  # a crash mid-write: temp dir
    (root / "step-15").mkdir()  # a directory without its completion marker
    (root / "step-15" / "trainable.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(root).name == "step-5"
    (root / "latest").write_text("step-15")  # even a pointer to an incomplete one is not followed
    assert latest_checkpoint(root).name == "step-5"


def test_mistyped_key_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as err:
        main(["train", TINY, "--out", str(out), "--set", "train.sav_every=3"])
    assert "train.sav_every" in str(err.value) and "save_every" in str(err.value)
    with pytest.raises(SystemExit) as err:
        main(["train", TINY, "--out", str(out), "--set", "stages.0.lora_rank=3"])
    assert "stages[0].lora_rank" in str(err.value) or "stages.0.lora_rank" in str(err.value)
    assert not out.exists()


def test_existing_run_needs_resume(reference_run):
    with pytest.raises(SystemExit, match="--resume"):
        main(["train", TINY, "--out", str(reference_run)])


def test_stage_presets_freeze_maps_and_param_groups(tiny_vlm):
    import copy

    model = copy.deepcopy(tiny_vlm)
    apply_stage(model, StageConfig(name="a", preset="align"))
    train = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert train == {"bridge"}
    apply_stage(model, StageConfig(name="q", preset="align", train_tower=True, frozen=["vision.blocks.0"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("vision.blocks.1") for n in names) and not any(
        n.startswith("vision.blocks.0") for n in names
    )
    stage = StageConfig(
        name="i",
        preset="instruct",
        lr=1e-3,
        weight_decay=0.1,
        module_lr={"bridge": 5e-3},
        lora=LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]),
    )
    plan = apply_stage(model, stage)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable if n.startswith("llm"))
    assert any("lora_" in n for n in trainable)
    by_id = {id(p): n for n, p in model.named_parameters()}
    for group in plan.groups:
        for p in group["params"]:
            name = by_id[id(p)]
            assert group["lr"] == (5e-3 if name.startswith("bridge") else 1e-3)
            assert group["weight_decay"] == (0.0 if p.ndim < 2 or name.endswith("bias") else 0.1)
    with pytest.raises(ValueError, match="no parameters under 'vison'"):
        apply_stage(model, StageConfig(name="x", preset="custom", trainable=["vison"]))
    with pytest.raises(ValueError, match="trains no parameters"):
        apply_stage(model, StageConfig(name="y", preset="custom", frozen=["llm"], trainable=[]))


def test_generation_metric_hook_logs_task_metrics(tmp_path):
    out = tmp_path / "gen"
    calls = []

    def hook(model, stage, step):
        calls.append((stage.name, step, model.training))
        return {"custom": 0.25}

    from vlmkit.train.trainer import Trainer

    recipe = load_config(
        RecipeConfig, TINY, ["stages.0.max_steps=2", "stages.1.max_steps=2", "train.plot=false"]
    )
    Trainer(recipe, out, generation_hook=hook).run()
    assert [(s, st) for s, st, _ in calls] == [("align", 2), ("instruct", 4)] and not any(
        t for *_, t in calls
    )
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "gen_custom" in r]
    assert [r["gen_custom"] for r in rows] == [0.25, 0.25]
    # the built-in hook: generate on N val records and score them by task
    main(
        [
            "train",
            TINY,
            "--out",
            str(tmp_path / "gen2"),
            "--set",
            "stages.0.max_steps=1",
            "stages.1.max_steps=1",
            "train.eval_generation=12",
            "train.plot=false",
        ]
    )
    rows = [
        r for r in read_metrics(tmp_path / "gen2" / "metrics.jsonl") if any(k.startswith("gen_") for k in r)
    ]
    assert len(rows) == 2 and any(k.startswith("gen_pope") or k.endswith("_acc") for k in rows[0])


def test_gradient_checkpointing_gives_the_same_losses(reference_run, tmp_path):
    out = tmp_path / "gc"
    main(["train", TINY, "--out", str(out), "--set", "train.gradient_checkpointing=true", "train.plot=false"])
    ref, ckpt = _losses(reference_run), _losses(out)
    assert sorted(ckpt) == sorted(ref)
    for step in ref:
        assert ckpt[step] == pytest.approx(ref[step], abs=1e-5), step


def test_recipe_tower_pretraining_reruns_only_when_its_settings_change(tmp_path):
    import shutil

    from vlmkit.config import RecipeConfig, load_config
    from vlmkit.train.trainer import Trainer

    def run(steps: int) -> dict:
        for entry in tmp_path.iterdir():  # a fresh run in the same directory, keeping its data and tower
            if entry.name not in ("vision-pretrain", "data"):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        recipe = load_config(RecipeConfig, "quickstart-tiny", [f"pretrain_vision.steps={steps}"])
        recipe.stages = recipe.stages[:1]
        recipe.stages[0].max_steps = 1
        Trainer(recipe, tmp_path).run()
        return json.loads((tmp_path / "vision-pretrain" / "metrics.json").read_text())

    assert run(2)["steps"] == 2
    stamp = (tmp_path / "vision-pretrain" / "vision.safetensors").stat().st_mtime_ns
    assert run(2)["steps"] == 2  # same settings: the pretrained tower is reused as it is
    assert (tmp_path / "vision-pretrain" / "vision.safetensors").stat().st_mtime_ns == stamp
    assert run(3)["steps"] == 3  # other settings: pretrained again, not silently reused


# ------------------------------------------------------------------------------------- data problems, said
def _own_file(path, n_good: int, n_bad: int = 0) -> str:
    """A LLaVA JSONL of text-only records with no `task` field, then `n_bad` records without an answer."""
    rows = [
        {
            "id": f"g{i}",
            "conversations": [{"from": "human", "value": f"Q{i}?"}, {"from": "gpt", "value": "A."}],
        }
        for i in range(n_good)
    ]
    rows += [{"id": f"b{i}", "conversations": [{"from": "human", "value": "Q?"}]} for i in range(n_bad)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_too_many_bad_samples_is_a_message_not_a_traceback(tmp_path):
    data = _own_file(tmp_path / "mine.jsonl", 16, 8)
    with pytest.raises(SystemExit) as err:
        main(
            [
                "train",
                TINY,
                "--out",
                str(tmp_path / "run"),
                "--set",
                f"data.train={data}",
                "stages.0.tasks=[]",
            ]
        )
    message = str(err.value)
    assert message.startswith("error: ") and "mine.jsonl" in message and "max_bad" in message
    assert "no_assistant_turn" in message


def test_a_task_filter_that_keeps_nothing_names_the_filter_and_the_tasks_found(tmp_path):
    data = _own_file(tmp_path / "mine.jsonl", 16)  # configs/tiny.yaml's stage 0 keeps `tasks: [caption]`
    with pytest.raises(SystemExit) as err:
        main(["train", TINY, "--out", str(tmp_path / "run"), "--set", f"data.train={data}"])
    message = str(err.value)
    assert message.startswith("error: ") and "mine.jsonl" in message
    assert "tasks" in message and "caption" in message  # the filter
    assert "16 records have no `task` field" in message  # what the file holds


@pytest.mark.parametrize("tower", ["vit", "clip", "dinov2+siglip"])
def test_gradient_checkpointing_recomputes_the_vision_tower_blocks(tower):
    """`train.gradient_checkpointing` checkpoints the tower's blocks too: blocks run again during backward
    (their activations were not kept), and the gradients are those of the plain forward."""
    from vlmkit.train.trainer import _enable_gradient_checkpointing

    from conftest import TINY_TOWERS, tiny_model_config

    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_model_config(vision=TINY_TOWERS[tower])).train()
    pixels = torch.randn(2, 3, model.vision.image_size, model.vision.image_size)
    blocks = [m for m in model.vision.modules() if isinstance(m, model.vision.block_cls)]
    calls = []
    for block in blocks:  # a block's runs, counted by its first LayerNorm's `forward` (hooks do not fire
        norm = next(m for m in block.modules() if isinstance(m, torch.nn.LayerNorm))  # when recomputing)

        def counted(*args, _forward=norm.forward, **kwargs):
            calls.append(1)
            return _forward(*args, **kwargs)

        norm.forward = counted

    def tower_grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        calls.clear()
        model.vision(pixels).float().pow(2).mean().backward()
        return [p.grad.clone() for p in model.vision.parameters() if p.grad is not None]

    plain = tower_grads()
    assert len(calls) == len(blocks)
    with warnings.catch_warnings():  # transformers' current name, not its deprecated alias (gone in v6)
        warnings.filterwarnings("error", message=".*gradient_checkpointing_enable.*deprecated")
        _enable_gradient_checkpointing(model)
    assert model.llm.decoder.is_gradient_checkpointing or model.llm.model.model.gradient_checkpointing
    checkpointed = tower_grads()
    # forward, then the recomputation during backward (of the blocks up to `select_layer`)
    assert len(calls) > len(blocks)
    assert len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def test_a_stage_frees_its_optimizer_before_merging_and_saving(tmp_path, monkeypatch):
    """The optimizer state (AdamW: two fp32 copies of what trains, a GiB for a full 135M-parameter stage) is gone
    before the stage merges LoRA and saves the model, not kept by the scheduler until the stage function returns."""
    import gc
    import weakref

    from vlmkit.train import trainer

    built, alive = [], []

    def recording_build(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)
        built.append(weakref.ref(optimizer))
        return optimizer

    def checking_merge(model):
        gc.collect()
        alive.append(any(ref() is not None for ref in built))
        return merge_lora(model)

    build_optimizer, merge_lora = trainer.build_optimizer, trainer.merge_lora
    monkeypatch.setattr(trainer, "build_optimizer", recording_build)
    monkeypatch.setattr(trainer, "merge_lora", checking_merge)
    stage = "stages=[{name: fit, preset: full, max_steps: 2, batch_size: 4, tasks: [counting]}]"
    main(["train", TINY, "--out", str(tmp_path / "run"), "--set", stage, "data.synthetic.n_train=8"])
    assert built and alive == [False]
