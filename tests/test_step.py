"""The fast training step: frozen weights stored in bf16, the attention kernel, their undoing at stage end."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch

from vlmkit.cli import main
from vlmkit.config import LoRAConfig, StageConfig, TrainConfig
from vlmkit.models.vlm import IGNORE_INDEX, VisionLanguageModel
from vlmkit.precision import autocast_context
from vlmkit.train.stages import apply_stage
from vlmkit.train.step import attention_for, speed_up

from conftest import random_image, tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lora_vlm():
    """A tiny VLM in its instruct stage: bridge + LoRA on every projection train, the rest is frozen."""
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_model_config()).train()
    apply_stage(
        model, StageConfig(name="instruct", preset="instruct", lora=LoRAConfig(r=4, alpha=8, dropout=0.0))
    )
    for name, param in model.named_parameters():  # LoRA B starts at 0: give the adapters some effect
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def _batch(model: VisionLanguageModel) -> dict:
    prompts = [
        "<image>\nWhat color is the square? red",
        "<image>\nHow many? 3 shapes: a red circle, two cubes",
    ]
    batch = model.prepare_prompts(prompts, [[random_image(0)], [random_image(1)]])
    labels = batch["input_ids"].clone()
    labels[(batch["attention_mask"] == 0) | (labels == model.image_token_id)] = IGNORE_INDEX
    return {**batch, "labels": labels}


def _loss_and_grads(model: VisionLanguageModel, batch: dict, precision: str):
    model.zero_grad(set_to_none=True)
    with autocast_context(precision, "cpu"):
        loss = model(**batch, return_logits=False).loss
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss), grads


def _cosine(a: dict, b: dict) -> float:
    x = torch.cat([a[k].flatten() for k in sorted(a)])
    y = torch.cat([b[k].flatten() for k in sorted(a)])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def test_frozen_weights_in_bf16_keep_the_loss_within_tolerance_of_fp32(lora_vlm):
    batch = _batch(lora_vlm)
    fp32_loss, fp32_grads = _loss_and_grads(lora_vlm, batch, "fp32")
    autocast_loss, autocast_grads = _loss_and_grads(lora_vlm, batch, "bf16")  # fp32 storage, bf16 compute

    linear = copy.deepcopy(lora_vlm)
    done = speed_up(linear, TrainConfig(precision="bf16", frozen_bf16="linear", attention="sdpa"), CPU)
    frozen_linear = [m.weight for m in linear.llm.modules() if isinstance(m, torch.nn.Linear)]
    assert done.bf16 and all(
        w.dtype == (torch.float32 if w.requires_grad or w is linear.llm.embeddings.weight else torch.bfloat16)
        for w in frozen_linear
    )
    assert linear.llm.embeddings.weight.dtype == torch.float32  # tied to the LM head: left as it is
    loss, grads = _loss_and_grads(linear, batch, "bf16")
    # exactly what autocast computed from fp32 storage: it cast these very weights to bf16 at every use
    assert loss == pytest.approx(autocast_loss, rel=1e-6, abs=1e-6)
    for name in autocast_grads:
        torch.testing.assert_close(grads[name], autocast_grads[name], rtol=1e-4, atol=1e-6)

    every = copy.deepcopy(lora_vlm)
    speed_up(every, TrainConfig(precision="bf16", frozen_bf16="all", attention="sdpa"), CPU)
    assert all(p.dtype == torch.bfloat16 for p in every.llm.parameters() if not p.requires_grad)
    loss, grads = _loss_and_grads(every, batch, "bf16")
    # bf16 hidden states too: within bf16 autocast's own distance from fp32
    tolerance = max(5e-3 * fp32_loss, 2 * abs(autocast_loss - fp32_loss))
    assert abs(loss - fp32_loss) < tolerance, (loss, fp32_loss, autocast_loss)
    assert _cosine(grads, fp32_grads) > 0.99

    for model in (linear, every):  # nothing but the trainable parameters needs gradients' fp32 master copies
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_undo_restores_dtypes_attention_and_ties(lora_vlm):
    model = copy.deepcopy(lora_vlm)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert model.llm.attention == "sdpa"
    done = speed_up(model, TrainConfig(precision="bf16", frozen_bf16="all", attention="auto"), CPU)
    assert model.llm.attention == "eager" == attention_for("auto", CPU)
    assert attention_for("auto", torch.device("cuda")) == "sdpa"
    with done.full_precision():  # e.g. generation outside autocast during a stage
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.llm.embeddings.weight.dtype == torch.bfloat16
    uncast = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert uncast and not any(m.cast_input_dtype_enabled for m in uncast)  # autocast's dtype, not fp32
    done.undo()
    assert all(m.cast_input_dtype_enabled for m in uncast)
    assert model.llm.attention == "sdpa"
    assert model.llm.lm_head.weight is model.llm.embeddings.weight  # still tied
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, name
        # the frozen weights' own values come back, not bf16-rounded ones: a saved model keeps its base LLM
        assert torch.equal(param, before[name]), name
    assert done.spill is None  # the originals' temporary file is gone


def test_frozen_originals_wait_on_disk_not_in_memory(lora_vlm, tmp_path, monkeypatch):
    """The fp32 originals of the weights stored in bf16 wait in a temporary file while the stage trains (no
    second copy in memory), and a stage that ends with an error leaves no file behind."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        model = copy.deepcopy(lora_vlm)
        done = speed_up(model, TrainConfig(precision="bf16", frozen_bf16="all"), CPU)
        assert done.spill is not None and done.spill.parent == tmp_path
        frozen = sum(p.numel() for p, _ in done.bf16)
        assert done.spill.stat().st_size == 4 * frozen  # fp32 bytes of every weight now stored in bf16
        done.discard()
        assert not list(tmp_path.iterdir())
    finally:
        tempfile.tempdir = None


def test_no_bf16_storage_without_bf16_autocast(lora_vlm):
    model = copy.deepcopy(lora_vlm)
    done = speed_up(model, TrainConfig(precision="fp32", frozen_bf16="all"), CPU)
    assert not done.bf16 and all(p.dtype == torch.float32 for p in model.parameters())
    done = speed_up(model, TrainConfig(precision="bf16", frozen_bf16="all"), CPU, sharded=True)
    assert not done.bf16  # FSDP units need one dtype
    with pytest.raises(ValueError, match="frozen_bf16 'half'"):
        speed_up(model, TrainConfig(precision="bf16", frozen_bf16="half"), CPU)


def test_eager_attention_computes_what_sdpa_computes(lora_vlm):
    model = copy.deepcopy(lora_vlm)
    batch = _batch(model)
    sdpa_loss, sdpa_grads = _loss_and_grads(model, batch, "fp32")
    model.llm.set_attention("eager")
    eager_loss, eager_grads = _loss_and_grads(model, batch, "fp32")
    assert eager_loss == pytest.approx(sdpa_loss, rel=1e-5)
    for name in sdpa_grads:
        torch.testing.assert_close(eager_grads[name], sdpa_grads[name], rtol=1e-4, atol=1e-6)


def test_a_bf16_run_saves_fp32_models_that_reload(tmp_path):
    """Under bf16 autocast the frozen weights train in bf16; each stage's saved model is fp32 again (merged
    LoRA included) and generation during validation runs on them outside autocast."""
    out = tmp_path / "run"
    settings = ["stages.0.max_steps=2", "stages.1.max_steps=2", "train.save_every=0"]
    settings += [
        "train.precision=bf16",
        "train.frozen_bf16=all",
        "train.eval_generation=2",
        "train.plot=false",
    ]
    assert main(["train", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), "--set", *settings]) == 0
    for path in (out / "stages" / "0-align" / "model", out / "model"):
        model = VisionLanguageModel.from_pretrained(path)
        assert all(p.dtype == torch.float32 for p in model.parameters()), path
        assert model.llm.attention == "sdpa"
