"""Interop with transformers' LlavaForConditionalGeneration: export, import, round trip, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

from vlmkit.cli import main
from vlmkit.config import BridgeConfig, FusionConfig, LLMConfig, ModelConfig, ProcessorConfig, VisionConfig
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


# ------------------------------------------------------------------- exports carry the processor (issue 15)
def _with_processor(tower: str, processor: ProcessorConfig) -> VisionLanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig.make("hf", hf_config=TOWERS[tower]),
        bridge=BridgeConfig.make("mlp"),
        llm=LLM,
        processor=processor,
    )
    model = VisionLanguageModel.from_config(cfg).eval()
    if model.llava_next:  # a visible newline token (transformers inits it at a small random scale too)
        with torch.no_grad():
            model.bridge.image_newline.normal_(0.0, 1.0)
    return model


CARRIED = {
    "pad": ("clip", ProcessorConfig(resize="pad"), [(50, 20), (16, 40)]),
    "anyres": (
        "clip",
        ProcessorConfig(
            resize="anyres", anyres_grid=[[64, 32], [32, 64], [64, 64]], anyres_layout="llava_next"
        ),
        [(50, 30), (30, 70), (90, 80)],
    ),
    "template": (
        "siglip",
        ProcessorConfig(template="vicuna_v1", system_prompt="Answer in one word."),
        [(40, 30), (20, 20)],
    ),
}


@pytest.mark.parametrize("case", sorted(CARRIED))
def test_transformers_processor_and_model_reproduce_vlmkit(case, tmp_path):
    """The exported processor + model give vlmkit's pixels, prompt string, token ids and logits (issue 15:
    `resize: pad`, AnyRes with the llava_next layout and a non-default template were exported as a stretch
    resize, one tile and the tokenizer's own template)."""
    from transformers import AutoModelForImageTextToText

    tower, proc_cfg, sizes = CARRIED[case]
    model = _with_processor(tower, proc_cfg)
    main(["export-hf", str(_save(model, tmp_path)), str(tmp_path / "hf")])
    hf_model = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    expected = "LlavaNextForConditionalGeneration" if case == "anyres" else "LlavaForConditionalGeneration"
    assert type(hf_model).__name__ == expected
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    for k, size in enumerate(sizes):
        image = random_image(k, size)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
        ours = model.processor.encode_chat(messages, [image])
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        enc = processor(images=[image], text=[text], return_tensors="pt", add_special_tokens=False)
        theirs_ids = enc["input_ids"][0]
        n = int((theirs_ids == model.image_token_id).sum())
        assert (
            text.replace("<image>", "<image>" * n) == ours.prompt
        )  # the prompt string, placeholders expanded
        assert torch.equal(theirs_ids, ours.input_ids)
        pixels = (
            enc["pixel_values"][0] if case == "anyres" else enc["pixel_values"]
        )  # LlavaNext: [1, tiles, ...]
        assert pixels.shape == ours.pixel_values.shape
        assert torch.allclose(pixels, ours.pixel_values, atol=1e-5)
        batch = model.prepare_prompts([ours.prompt.replace("<image>" * n, "<image>")], [[image]])
        with torch.no_grad():
            logits_ours = model(**batch).logits
            logits_theirs = hf_model(**enc).logits
        assert torch.allclose(logits_ours, logits_theirs, atol=1e-5)
    if case == "template":  # the training template and system prompt, not the tokenizer's ChatML
        assert text.startswith("Answer in one word. USER: <image>\nWhat is it? ASSISTANT:")


def test_export_names_tower_tensors_and_config_as_vllm_loads_them(tmp_path):
    """vLLM's Llava loader maps `vision_tower.` onto its CLIP/SigLIP module, whose tensors live under
    `vision_model.`; a `text_config.quantization_config` left from loading a GGUF file makes it refuse the
    (plain) weights with `Unknown quantization method: gguf` (issue 15)."""
    from safetensors import safe_open

    for tower in ("clip", "siglip"):
        model = _model(tower, "mlp")
        model.llm.model.config.quantization_config = {
            "quant_method": "gguf",
            "gguf_file": "x.gguf",
        }  # as GGUF
        out = export_hf(model, tmp_path / tower)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        tower_keys = [k for k in keys if k.startswith("vision_tower.")]
        assert tower_keys and all(k.startswith("vision_tower.vision_model.") for k in tower_keys)
        assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
        assert any(k.startswith("vision_tower.vision_model.encoder.layers.0.") for k in keys)
        assert {k.split(".")[0] for k in keys} == {"vision_tower", "multi_modal_projector", "language_model"}
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["LlavaForConditionalGeneration"]
        assert "quantization_config" not in config["text_config"] and "quantization_config" not in config
        assert config["vision_config"]["model_type"] == TOWERS[tower]["model_type"]
        assert config["text_config"]["model_type"] == "llama"
        assert config["image_token_index"] == model.image_token_id
        assert config["vision_feature_select_strategy"] == ("default" if tower == "clip" else "full")
        # transformers itself still loads the renamed tensors (the logits test above covers the values)
        assert LlavaForConditionalGeneration.from_pretrained(out).config.vision_config.model_type


def test_export_refuses_what_it_cannot_carry_with_the_reason(tmp_path):
    crop = _with_processor("clip", ProcessorConfig(resize="crop"))
    with pytest.raises(ExportError, match="processor.resize 'crop'"):
        export_hf(crop, tmp_path / "crop")
    tiles = _with_processor("clip", ProcessorConfig(resize="anyres", anyres_grid=[[64, 32]]))
    with pytest.raises(ExportError, match="anyres_layout 'tiles'.*'llava_next'"):
        export_hf(tiles, tmp_path / "tiles")
    with pytest.raises(SystemExit, match="processor.resize 'crop'"):
        main(["export-hf", str(crop.save_pretrained(tmp_path / "crop-model")), str(tmp_path / "x")])
    assert not any((tmp_path / name).exists() for name in ("crop", "tiles", "x"))


def test_import_tiny_transformers_llava_next_with_equal_logits(tmp_path):
    """A LlavaNext checkpoint made by transformers imports as an AnyRes model with the llava_next layout."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    torch.manual_seed(2)
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    pinpoints = [[32, 64], [64, 32], [64, 64]]  # (height, width)
    config = LlavaNextConfig(
        vision_config=TOWERS["clip"],
        text_config={**TINY_LLAMA, "vocab_size": len(tokenizer), "initializer_range": 0.3},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
    )
    hf_model = LlavaNextForConditionalGeneration(config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    image_processor = LlavaNextImageProcessorPil(
        size={"height": 32, "width": 32},
        crop_size={"height": 32, "width": 32},
        do_center_crop=False,
        image_grid_pinpoints=pinpoints,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(tmp_path / "hf")

    main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ours")])
    ours = VisionLanguageModel.from_pretrained(tmp_path / "ours")
    assert ours.llava_next and ours.cfg.processor.anyres_grid == [[64, 32], [32, 64], [64, 64]]
    for k, size in enumerate([(50, 30), (30, 70)]):
        image = random_image(k, size)
        enc = processor(images=[image], text=["<image>\nWhat is it?"], return_tensors="pt")
        batch = ours.prepare_prompts(["<image>\nWhat is it?"], [[image]])
        assert torch.equal(batch["input_ids"][0], enc["input_ids"][0])
        with torch.no_grad():
            assert torch.allclose(ours(**batch).logits, hf_model(**enc).logits, atol=1e-5)
