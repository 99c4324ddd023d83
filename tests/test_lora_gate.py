"""Image-gated LoRA: text-only prompts run the base LLM exactly (training, generation, save/load, export)."""

from __future__ import annotations

import pytest
import torch

from vlmkit.config import LoRAConfig, StageConfig
from vlmkit.models.lora import rows_with_image
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.stages import apply_stage, merge_lora

from conftest import random_image, tiny_model_config

GATED = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], gate="image")


def _model() -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel.from_config(tiny_model_config()).eval()


def _perturb_lora(model: VisionLanguageModel) -> None:
    """Make the adapters non-zero (peft starts lora_B at 0), as training would."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


def _prompts(model, with_image=(False, True, False)):
    prompts = [
        ("<image>\n" if img else "") + f"Question {i}: what is it?" for i, img in enumerate(with_image)
    ]
    images = [[random_image(i)] if img else [] for i, img in enumerate(with_image)]
    return model.prepare_prompts(prompts, images)


def test_text_only_generation_is_bit_identical_to_the_base_model(tmp_path):
    base = _model()
    text_batch = _prompts(base, (False, False))
    expected = base.generate(**text_batch, max_new_tokens=8)
    base_logits = base(**text_batch).logits

    model = _model()
    apply_stage(model, StageConfig(name="instruct", preset="instruct", lora=GATED))
    _perturb_lora(model)
    model.eval()
    assert model.lora_gate is not None and model.cfg.lora is not None
    assert torch.equal(model.generate(**text_batch, max_new_tokens=8), expected)
    with torch.no_grad():
        assert torch.equal(model(**text_batch).logits, base_logits)
    # the adapter does act on prompts with an image
    image_batch = _prompts(base, (True,))
    with torch.no_grad():
        assert not torch.allclose(model(**image_batch).logits, base(**image_batch).logits)

    # the stage end keeps a gated adapter apart; it is saved with the model and gated after loading
    merge_lora(model)
    assert model.lora_gate is not None
    loaded = VisionLanguageModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.lora_gate is not None and loaded.cfg.lora.gate == "image"
    assert torch.equal(loaded.generate(**text_batch, max_new_tokens=8), expected)
    with torch.no_grad():
        assert torch.equal(loaded(**image_batch).logits, model(**image_batch).logits)


def test_mixed_batch_gates_each_row():
    base = _model()
    model = _model()
    model.add_lora(GATED)
    _perturb_lora(model)
    mixed = _prompts(model, (False, True, False))
    with torch.no_grad():
        gated = model(**mixed).logits
        plain = base(**mixed).logits
    assert torch.equal(gated[0], plain[0]) and torch.equal(gated[2], plain[2])  # text-only rows: base model
    assert not torch.allclose(gated[1], plain[1])
    # the image row gets exactly what an ungated adapter gives it
    gate, model.lora_gate = model.lora_gate, None
    gate.set(None)  # hooks stay, without a mask: adapters on every row
    with torch.no_grad():
        everywhere = model(**mixed).logits
    model.lora_gate = gate
    assert torch.equal(gated[1], everywhere[1]) and not torch.allclose(everywhere[0], plain[0])
    # generation honours the same gate row by row
    text_only = _prompts(model, (False, False))
    tokens = model.generate(**mixed, max_new_tokens=6)
    assert torch.equal(tokens[0], base.generate(**mixed, max_new_tokens=6)[0])
    assert torch.equal(
        model.generate(**text_only, max_new_tokens=6), base.generate(**text_only, max_new_tokens=6)
    )


def test_training_step_leaves_text_rows_without_lora_gradient():
    """A text-only batch puts no gradient on the adapters: only image rows train them."""
    model = _model().train()
    apply_stage(model, StageConfig(name="instruct", preset="instruct", lora=GATED))
    _perturb_lora(model)
    batch = _prompts(model, (False, False))
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    out.loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is None or not p.grad.any() for p in lora.values())
    model.zero_grad()
    batch = _prompts(model, (True, False))
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    out.loss.backward()
    assert any(p.grad is not None and p.grad.any() for p in lora.values())


def test_ungated_lora_merges_at_stage_end():
    model = _model()
    apply_stage(model, StageConfig(name="instruct", preset="instruct", lora=LoRAConfig(r=4, dropout=0.0)))
    assert model.lora_gate is None and model.cfg.lora is None
    merge_lora(model)
    assert not hasattr(model.llm.model, "merge_and_unload")


def test_rows_with_image_for_padded_and_packed_rows():
    ids = torch.tensor([[5, 9, 9, 6], [5, 6, 7, 8]])
    assert rows_with_image(ids, 9).tolist() == [True, False]
    # a packed row: sample 1 (positions 0-1) text only, sample 2 (positions 0-2) with an image
    packed = torch.tensor([[5, 6, 9, 9, 7]])
    positions = torch.tensor([[0, 1, 0, 1, 2]])
    assert rows_with_image(packed, 9, positions).tolist() == [[False, False, True, True, True]]


def test_unknown_gate_and_gated_qlora_are_refused():
    from vlmkit.config import ConfigError

    with pytest.raises(ConfigError, match="gate: unknown value 'images'; allowed: none, image"):
        LoRAConfig(gate="images")
    with pytest.raises(ConfigError, match="gate: image .* with quantize: 4bit use gate: none"):
        LoRAConfig(gate="image", quantize="4bit")


def test_served_rows_get_the_adapter_only_with_an_image():
    """The server's engine (continuous batching, its own rows, fused and prepacked linears on CPU) gates per row: in one
    decode batch a text-only request gets the base model's answer and an image request the adapted model's."""
    import dataclasses

    from vlmkit.config import LLMConfig
    from vlmkit.infer.engine import Engine, RowSink
    from vlmkit.infer.generate import ChatRequest, Predictor
    from vlmkit.infer.prepack import fuse_projections, prepack_linears
    from vlmkit.models.generation import GenerationConfig

    def ask(text, images=0):
        content = [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}]
        return [{"role": "user", "content": content}]

    def lively():  # answers that vary with the prompt and the weights
        torch.manual_seed(0)
        llm = LLMConfig.make("tiny", hf_config={"initializer_range": 0.3})
        return VisionLanguageModel.from_config(tiny_model_config(llm=llm)).eval()

    def serve(model, requests):
        engine, got = Engine(Predictor(model), max_rows=4, prefill_chunk=4), {}
        for name, request in requests.items():
            engine.add(engine.prepare(request), RowSink(on_done=lambda r, n=name: got.__setitem__(n, r.text)))
            engine.step()  # the next row joins while this one decodes
        while engine.busy:
            engine.step()
        return got

    greedy = GenerationConfig(eos_token_ids=[-1], max_new_tokens=12)
    image = ChatRequest(ask("what?", 1), [random_image(1)], greedy)
    text = ChatRequest(ask("hello there, how are you?"), [], dataclasses.replace(greedy, max_new_tokens=10))
    base, model = lively(), lively()
    apply_stage(model, StageConfig(name="instruct", preset="instruct", lora=GATED))
    _perturb_lora(model)
    model.eval()
    for m in (base, model):  # what `vlmkit serve` does on CPU: the LoRA branches (and their gate) stay
        fuse_projections(m)
        prepack_linears(m)
    want = {
        "image": Predictor(model).generate([image])[0].text,
        "text": Predictor(base).generate([text])[0].text,
    }
    assert want["image"] != Predictor(base).generate([image])[0].text  # the adapter changes the image answer
    gate, model.lora_gate = model.lora_gate, None
    assert serve(model, {"text": text})["text"] != want["text"]  # ... and would change the text answer
    model.lora_gate = gate
    assert serve(model, {"image": image, "text": text}) == want
