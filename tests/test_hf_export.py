"""Interop with transformers' LlavaForConditionalGeneration: export, import, round trip, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from vlmkit.cli import main
from vlmkit.config import BridgeConfig, FusionConfig, LLMConfig, ModelConfig, VisionConfig
from vlmkit.models.hf_export import ExportError, export_hf, import_hf, to_llava
from vlmkit.models.llm import TINY_LLAMA
from vlmkit.models.tiny_tokenizer import build_tiny_tokenizer
from vlmkit.models.vlm import VisionLanguageModel

from conftest import random_image

TOWERS = {
    "clip": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    "siglip": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
}
# a large init range so greedy decoding of a random model is not one repeated token
LLM = LLMConfig.make("tiny", hf_config={"initializer_range": 0.3})


def _model(tower: str, bridge: str) -> VisionLanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig.make("hf", hf_config=TOWERS[tower]), bridge=BridgeConfig.make(bridge), llm=LLM
    )
    return VisionLanguageModel.from_config(cfg).eval()


def _batch(model):
    return model.prepare_prompts(
        ["<image>\nWhat is it?", "two <image> words"], [[random_image(0)], [random_image(1)]]
    )


@pytest.mark.parametrize("tower,bridge", [("clip", "mlp"), ("siglip", "linear"), ("clip", "linear")])
def test_export_loads_in_transformers_with_equal_logits_and_generation(tower, bridge, tmp_path):
    model = _model(tower, bridge)
    batch = _batch(model)
    main(["export-hf", str(_save(model, tmp_path)), str(tmp_path / "hf")])
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    hf_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = llava(**hf_inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    new_ours = model.generate(**batch, max_new_tokens=8, eos_token_ids=[-1])
    new_theirs = llava.generate(**hf_inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert len(set(new_ours[0].tolist())) > 1  # a non-degenerate sequence
    assert torch.equal(new_ours, new_theirs[:, batch["input_ids"].shape[1] :])
    # the exported processor reproduces our preprocessing and placeholder expansion
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    enc = processor(images=[random_image(0)], text=["<image>\nWhat is it?"], return_tensors="pt")
    assert torch.allclose(enc["pixel_values"][0], batch["pixel_values"][0], atol=1e-5)
    assert torch.equal(enc["input_ids"][0], batch["input_ids"][0][batch["attention_mask"][0].bool()])


def _save(model, tmp_path):
    return model.save_pretrained(tmp_path / "ours")


def test_export_merges_an_image_gated_lora_and_says_so(tmp_path, caplog):
    from vlmkit.config import LoRAConfig

    model = _model("clip", "mlp")
    model.add_lora(LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], gate="image"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    batch = _batch(model)
    with torch.no_grad():
        gated = model(**batch).logits  # every row has an image: the adapter acts on all of them
    saved = _save(model, tmp_path)
    with caplog.at_level("WARNING"):
        main(["export-hf", str(saved), str(tmp_path / "hf")])
    assert "merging the image-gated LoRA" in caplog.text and "text-only prompts differently" in caplog.text
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    hf_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        assert torch.allclose(llava(**hf_inputs).logits, gated, atol=1e-4)


def test_import_tiny_transformers_llava_and_round_trip(tmp_path):
    torch.manual_seed(1)
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = {**TINY_LLAMA, "vocab_size": len(tokenizer), "initializer_range": 0.3}
    config = LlavaConfig(
        vision_config=TOWERS["clip"],
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
    )
    llava = LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")

    main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ours")])
    ours = VisionLanguageModel.from_pretrained(tmp_path / "ours")
    assert ours.cfg.bridge.kind == "mlp" and ours.cfg.vision.select_layer == -2
    batch = _batch(ours)
    hf_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        original = llava(**hf_inputs).logits
        assert torch.allclose(ours(**batch).logits, original, atol=1e-5)
        exported = to_llava(ours)
        assert torch.allclose(
            exported(**hf_inputs).logits, original, atol=1e-5
        )  # import -> export round trip


def test_import_of_our_own_export_gives_same_model(tmp_path):
    model = _model("siglip", "linear")
    export_hf(model, tmp_path / "hf")
    again = import_hf(tmp_path / "hf")
    assert again.cfg.bridge.kind == "linear" and not again.cfg.vision.drop_prefix_tokens
    batch = _batch(model)
    with torch.no_grad():
        assert torch.allclose(again(**batch).logits, model(**batch).logits, atol=1e-5)


def test_unexportable_combinations_fail_clearly(tmp_path):
    torch.manual_seed(0)
    vit = VisionLanguageModel.from_config(
        ModelConfig(
            vision=VisionConfig.make("vit", image_size=32),
            bridge=BridgeConfig.make("perceiver", num_queries=4, num_heads=2),
            llm=LLM,
        )
    )
    with pytest.raises(ExportError) as err:
        export_hf(vit, tmp_path / "x")
    assert "vision tower 'vit'" in str(err.value) and "bridge 'perceiver'" in str(err.value)
    xattn = VisionLanguageModel.from_config(
        ModelConfig(
            vision=VisionConfig.make("hf", hf_config=TOWERS["clip"]),
            bridge=BridgeConfig.make("mlp"),
            llm=LLM,
            fusion=FusionConfig.make("xattn"),
        )
    )
    with pytest.raises(ExportError, match="fusion 'xattn'"):
        to_llava(xattn)
    assert not (tmp_path / "x").exists()
