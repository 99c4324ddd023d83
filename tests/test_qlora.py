"""QLoRA (`lora.quantize: 4bit`): refused clearly before any work where it cannot run; where it runs, the frozen
LLM's linear layers are 4-bit NF4 (double quantization, bf16 compute) under trainable LoRA adapters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from vlmkit.cli import main
from vlmkit.config import LoRAConfig, RecipeConfig, StageConfig, load_config
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.stages import (
    QuantizationUnavailableError,
    apply_lora,
    apply_stage,
    merge_lora,
    quantization_problem,
)
from vlmkit.train.trainer import Trainer

from conftest import random_image, tiny_model_config

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
QLORA = ["stages.1.lora.quantize=4bit"]


# ------------------------------------------------------------------------------------ refused, before any work
def test_4bit_without_cuda_is_refused_at_trainer_start(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = load_config(RecipeConfig, TINY, QLORA)
    out = tmp_path / "run"
    with pytest.raises(QuantizationUnavailableError) as err:
        Trainer(recipe, out)  # before the run directory, the data or the model
    msg = str(err.value)
    assert "stage 1 'instruct'" in msg and "lora.quantize: 4bit" in msg and "CUDA GPU" in msg
    assert "stages.1.lora.quantize=none" in msg  # and how to go on without it
    assert not out.exists()
    with pytest.raises(SystemExit) as err:  # the CLI: a message, not a traceback, and nothing written
        main(["train", TINY, "--out", str(out), "--set", *QLORA])
    assert str(err.value).startswith("error: stage 1 'instruct': lora.quantize: 4bit (QLoRA) needs")
    assert not out.exists()


def test_4bit_without_bitsandbytes_names_the_package_and_how_to_get_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # even with a GPU
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    problem = quantization_problem("4bit")
    assert problem is not None and "bitsandbytes" in problem and "pip install 'vlmkit[qlora]'" in problem
    assert "CUDA" not in problem  # only what is missing
    with pytest.raises(QuantizationUnavailableError, match=r"vlmkit\[qlora\]"):
        Trainer(load_config(RecipeConfig, TINY, QLORA), tmp_path / "run")
    assert quantization_problem("none") is None


def test_4bit_under_fsdp_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("vlmkit.train.stages.quantization_problem", lambda mode: None)  # a capable machine
    recipe = load_config(RecipeConfig, TINY, [*QLORA, "train.strategy=fsdp"])
    with pytest.raises(QuantizationUnavailableError, match="fsdp"):
        Trainer(recipe, tmp_path / "run")


def test_applying_a_4bit_stage_where_it_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_model_config())
    stage = StageConfig(name="q", preset="instruct", lora=LoRAConfig(r=4, quantize="4bit"))
    with pytest.raises(QuantizationUnavailableError, match="CUDA"):
        apply_stage(model, stage)
    assert not any("lora_" in n for n, _ in model.named_parameters())  # nothing half-applied


# ------------------------------------------------------------------------------------------ the 4-bit model
def _qlora_model(device: str):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_model_config()).train()
    plain_linears = sum(
        type(m) is nn.Linear for m in model.llm.model.modules() if m is not model.llm.model.lm_head
    )
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], quantize="4bit")
    stage = StageConfig(name="qlora", preset="instruct", lora=lora, lr=1e-2, max_grad_norm=0.0)
    if device == "cuda":
        plan = apply_stage(model, stage)  # the product path: the current CUDA device
    else:
        apply_lora(model, lora, device=device)  # the same layers on bitsandbytes' CPU backend
        plan = apply_stage(model, stage)
    return bnb, model.to(device), plan, plain_linears


def _batch(model: VisionLanguageModel, device: str) -> dict:
    batch = model.prepare_prompts(
        ["<image> a red circle", "<image> two blue squares left"], [[random_image(2)], [random_image(3)]]
    )
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


cuda_only = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only), "cpu"])
def test_4bit_nf4_layers_under_lora_train_one_step_and_merge(device, tmp_path):
    bnb, model, plan, plain_linears = _qlora_model(device)
    llm = model.llm.model
    quantized = [m for m in llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == plain_linears > 0  # every linear layer of the LLM but its head
    for layer in quantized:
        assert layer.weight.quant_type == "nf4" and layer.weight.quant_state.nested  # double quantization
        assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.uint8
        assert layer.weight.device.type == device and not layer.weight.requires_grad
    assert type(llm.get_output_embeddings()) is nn.Linear  # the head stays as it was
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("llm.")]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable if "lora_A" in n} == {"q_proj", "v_proj"}

    packed = {id(m): m.weight.data.clone() for m in quantized}
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    batch = _batch(model, device)
    optimizer = torch.optim.AdamW(plan.groups)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, lora_b[n]) for n, p in model.named_parameters() if n in lora_b)  # trained
    assert all(torch.equal(m.weight.data, packed[id(m)]) for m in quantized)  # the 4-bit base did not move

    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        before = model(**batch).logits.float()
    merge_lora(model)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        after = model(**batch).logits.float()
    # the dequantized weights + the adapters' update: the same model, up to bf16 rounding
    torch.testing.assert_close(after, before, atol=0.05, rtol=0.05)
    saved = model.save_pretrained(tmp_path / "merged")  # plain weights: saves and loads like any model
    loaded = VisionLanguageModel.from_pretrained(saved).to(device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        torch.testing.assert_close(loaded(**batch).logits.float(), after)
