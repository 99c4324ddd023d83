"""Gated cross-attention fusion: identity at init, media masking, gradients, KV-cache equivalence, save/load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vlmkit.config import FusionConfig, LLMConfig
from vlmkit.models.fusion.xattn import XAttnDecoderLayer, XAttnFusion
from vlmkit.models.vlm import VisionLanguageModel

from conftest import random_image, tiny_model_config

PROMPTS = [
    "Look: <image>\nand <image>\nthen <image>\nwhat changed?",  # several images
    "Just text, no picture here.",  # text-only row
    "Some words before <image>\ndescribe it",  # text before its only image
]


def _model(every: int = 1, heads: int = 4, **llm: str) -> VisionLanguageModel:
    torch.manual_seed(0)
    fusion = FusionConfig.make("xattn", every=every, heads=heads)
    cfg = tiny_model_config(fusion=fusion, llm=LLMConfig.make("tiny", **llm))
    return VisionLanguageModel.from_config(cfg).eval()


def _batch(model: VisionLanguageModel, seed: int = 0) -> dict:
    images = [
        [random_image(seed + 10 * row + i) for i in range(p.count("<image>"))]
        for row, p in enumerate(PROMPTS)
    ]
    return model.prepare_prompts(PROMPTS, images)


def _open_gates(model: VisionLanguageModel, value: float = 1.0) -> None:
    with torch.no_grad():
        for block in model.fusion.blocks.values():
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(-value)


def _bare_logits(model: VisionLanguageModel, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.llm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _first_image_pos(model: VisionLanguageModel, ids: torch.Tensor) -> list[int]:
    """Per row, the position of the first image token (the row length when it has none)."""
    is_image = ids == model.image_token_id
    return [int(row.nonzero()[0]) if row.any() else len(row) for row in is_image]


def test_blocks_inserted_every_nth_layer_without_double_registration():
    model = _model(every=2)
    layers = model.llm.layers
    assert not isinstance(layers[0], XAttnDecoderLayer)
    assert isinstance(layers[1], XAttnDecoderLayer)
    assert list(model.fusion.blocks) == ["1"]
    assert layers[1].xattn is model.fusion.blocks["1"]
    assert layers[1].self_attn is layers[1].layer.self_attn  # other attributes read through to the layer
    keys = model.state_dict().keys()
    assert "llm.model.model.layers.1.layer.self_attn.q_proj.weight" in keys  # original weights, recognisable
    assert "fusion.blocks.1.attn_gate" in keys
    assert not any("xattn" in k for k in keys)
    every_name = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    block_names = [n for n in every_name if n.startswith("fusion.")]
    assert len(block_names) == len(
        list(model.fusion.blocks["1"].parameters())
    )  # registered once, under fusion
    assert not any(".xattn." in n for n in every_name)
    with pytest.raises(ValueError, match="already has cross-attention"):
        XAttnFusion(model.llm, FusionConfig.make("xattn"))
    with pytest.raises(ValueError, match="divide"):
        _model(heads=5)
    with pytest.raises(ValueError, match="selects none"):
        _model(every=3)


def test_identity_at_init_for_any_images():
    model = _model()
    for seed in (0, 100):
        batch = _batch(model, seed)
        with torch.no_grad():
            logits = model(**batch).logits
        torch.testing.assert_close(logits, _bare_logits(model, batch), atol=1e-6, rtol=0)
    # The blocks are live: opening the gates changes the output, so the equality above is not vacuous.
    _open_gates(model)
    with torch.no_grad():
        assert (model(**batch).logits - _bare_logits(model, batch)).abs().max() > 1e-3


def test_identity_at_init_with_bfloat16_llm():
    model = _model(dtype="bfloat16")
    batch = _batch(model)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, _bare_logits(model, batch))


def test_only_tokens_at_or_after_an_image_change():
    model = _model()
    _open_gates(model)
    batch = _batch(model)
    with torch.no_grad():
        logits = model(**batch).logits
    bare = _bare_logits(model, batch)
    assert torch.isfinite(logits).all()  # fully masked rows give no NaN
    diff = (logits - bare).abs().amax(dim=-1)  # [B, T]
    for row, first in enumerate(_first_image_pos(model, batch["input_ids"])):
        assert diff[row, :first].max() < 1e-6, f"row {row}: a token before the first image changed"
        if first < diff.shape[1]:
            assert diff[row, first:].min() > 1e-5, f"row {row}: a token after an image is unaffected"
    assert diff[1].max() < 1e-6  # the text-only row equals the bare LLM


def test_each_token_attends_only_to_its_latest_image():
    model = _model()
    _open_gates(model)
    captured = []
    handle = model.fusion.blocks["0"].register_forward_hook(lambda mod, args, out: captured.append(out))
    batch = _batch(model)
    pixels = batch["pixel_values"]  # [5, 3, S, S]: row 0's three images, then row 2's one
    try:
        with torch.no_grad():
            model(**batch)
            for change in range(3):  # change one of row 0's images at a time
                other = pixels.clone()
                other[change] = torch.randn_like(other[change])
                model(**{**batch, "pixel_values": other})
    finally:
        handle.remove()
    base = captured[0]  # first-layer block output [B, T, D]: before any self-attention mixes tokens
    image_pos = (batch["input_ids"][0] == model.image_token_id).nonzero().flatten().tolist()
    bounds = [*image_pos, batch["input_ids"].shape[1]]
    for change, out in enumerate(captured[1:]):
        diff = (out[0] - base[0]).abs().amax(dim=-1)  # [T]
        lo, hi = bounds[change], bounds[change + 1]
        assert diff[lo:hi].min() > 1e-5, f"tokens after image {change} ignore it"
        assert (diff[:lo] == 0).all() and (diff[hi:] == 0).all(), f"image {change} leaks outside its span"
        torch.testing.assert_close(out[1:], base[1:], atol=0, rtol=0)  # other rows untouched


def test_gradients_reach_fusion_not_frozen_llm():
    model = _model().train()
    model.llm.requires_grad_(False)
    batch = _batch(model)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for block in model.fusion.blocks.values():  # gates at 0: only the gates get a gradient (Flamingo)
        assert block.attn_gate.grad.abs() > 0 and block.ff_gate.grad.abs() > 0
    model.zero_grad(set_to_none=True)
    _open_gates(model, 0.5)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    for name, p in model.fusion.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is not None for p in model.bridge.parameters())  # visual tokens are differentiable


def _record_steps(model: VisionLanguageModel) -> list[torch.Tensor]:
    """Make `model.generate` record each step's last-position logits [B, V]."""
    steps, inner = [], model._step

    def step(*args):
        out = inner(*args)
        steps.append(out.logits[:, -1].clone())
        return out

    model._step = step
    return steps


def test_kv_cached_generation_matches_uncached_and_forward():
    model = _model()
    _open_gates(model)
    batch = _batch(model)
    bare_before = _bare_logits(model, batch)
    steps = _record_steps(model)
    cached = model.generate(**batch, max_new_tokens=6, eos_token_ids=[-1])
    cached_steps = list(steps)
    steps.clear()
    uncached = model.generate(**batch, max_new_tokens=6, eos_token_ids=[-1], use_cache=False)
    # no media state outlives a call: the plain LLM afterwards is exactly the plain LLM before
    torch.testing.assert_close(_bare_logits(model, batch), bare_before, atol=0, rtol=0)
    assert cached.shape == (3, 6)
    assert torch.equal(cached, uncached)
    for a, b in zip(cached_steps, steps, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Each decoding step sees the same images as a plain forward over prompt + generated tokens.
    ids = torch.cat([batch["input_ids"], cached], dim=1)
    mask = torch.ones_like(ids)
    mask[:, : batch["attention_mask"].shape[1]] = batch["attention_mask"]
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(**{**batch, "input_ids": ids, "attention_mask": mask}, position_ids=positions).logits
    start = batch["input_ids"].shape[1] - 1
    for k, step_logits in enumerate(cached_steps):
        torch.testing.assert_close(step_logits, logits[:, start + k], atol=1e-5, rtol=1e-5)
    bare = _bare_logits(model, {"input_ids": ids, "attention_mask": mask})
    assert (logits[:, start:] - bare[:, start:]).abs().max() > 1e-3  # the generated steps do use the images


def test_save_load_round_trip(tmp_path):
    model = _model()
    _open_gates(model, 0.3)
    batch = _batch(model)
    with torch.no_grad():
        before = model(**batch).logits
    out = model.save_pretrained(tmp_path / "xattn")
    saved = load_file(str(out / "model.safetensors"))
    assert saved["fusion.blocks.0.attn_gate"].item() == pytest.approx(0.3)
    loaded = VisionLanguageModel.from_pretrained(out)
    assert isinstance(loaded.fusion, XAttnFusion)
    assert loaded.fusion.blocks["1"].attn_gate.item() == pytest.approx(0.3)
    with torch.no_grad():
        after = loaded(**batch).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def _packing_item(sid: str, ids: list[int], images: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "id": sid,
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(ids),
        "pixel_values": torch.randn(images, 3, 32, 32, generator=g) if images else None,
        "image_count": images,
        "num_tiles": [1] * images,
        "length": len(ids),
    }


def test_packed_samples_cross_attend_only_to_their_own_images():
    """A packed row under xattn: each sample's tokens see only that sample's images, so its logits equal the
    unpacked ones (a text-only sample after an image sample sees no image; text before a sample's own first
    image sees none either)."""
    from vlmkit.data.collate import Collator, PackingCollator, model_inputs

    model = _model()
    _open_gates(model)
    tok, pad = model.image_token_id, model.tokenizer.pad_token_id
    g = torch.Generator().manual_seed(0)

    def text(n: int) -> list[int]:
        return torch.randint(5, 700, (n,), generator=g).tolist()

    items = [
        _packing_item("image", [1, *text(3), tok, *text(8)], images=1, seed=1),
        _packing_item("text-only", [1, *text(11)], images=0, seed=2),
        _packing_item("image-later", [1, *text(4), tok, *text(5), tok, *text(3)], images=2, seed=3),
    ]
    packed = PackingCollator(pad, max_length=64)(items)
    assert packed["sample_ids"] == ["image+text-only+image-later"]  # one row: the samples share it
    unpacked = Collator(pad, padding_side="right")(items)
    with torch.no_grad():
        logits_p = model(**model_inputs(packed)).logits  # [1, 64, V]
        logits_u = model(**model_inputs(unpacked)).logits  # [3, T, V]
    for k, item in enumerate(items):
        cols = (packed["sample_index"][0] == k).nonzero().squeeze(1)
        torch.testing.assert_close(logits_p[0, cols], logits_u[k, : item["length"]], atol=1e-4, rtol=1e-4)
