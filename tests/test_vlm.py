"""VisionLanguageModel: placeholder filling, mismatch errors, mixed batches, generation, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from vlmkit.constants import IGNORE_INDEX
from vlmkit.models.vlm import ImageTokenMismatchError, VisionLanguageModel

from conftest import random_image, tiny_model_config


def _batch(model, n_images=(2, 0, 1)):
    prompts, images = [], []
    for row, n in enumerate(n_images):
        imgs = [random_image(10 * row + i) for i in range(n)]
        prompts.append(
            "".join(f"Picture {i + 1}: <image>\n" for i in range(n)) + f"Question {row}: what is it?"
        )
        images.append(imgs)
    return model.prepare_prompts(prompts, images)


def test_placeholders_filled_in_order_with_mixed_batch(tiny_vlm):
    batch = _batch(tiny_vlm)
    ids = batch["input_ids"]
    per_image = tiny_vlm.tokens_per_image()
    assert per_image == 16  # 32-px image, 8-px patches, per-patch MLP bridge
    assert (ids == tiny_vlm.image_token_id).sum(dim=1).tolist() == [2 * per_image, 0, per_image]
    captured = {}
    handle = tiny_vlm.llm.model.register_forward_pre_hook(
        lambda mod, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = tiny_vlm(**batch)
    finally:
        handle.remove()
    assert out.logits.shape == (*ids.shape, len(tiny_vlm.tokenizer))
    with torch.no_grad():
        visual = tiny_vlm.encode_images(batch["pixel_values"])  # [3, 16, D]
        text = tiny_vlm.llm.embed(ids)
    embeds = captured["embeds"]
    pos = (ids == tiny_vlm.image_token_id).nonzero()
    filled = embeds[pos[:, 0], pos[:, 1]]
    assert torch.equal(filled, visual.reshape(-1, visual.shape[-1]))  # row 0 image 1, image 2, then row 2
    keep = ids != tiny_vlm.image_token_id
    assert torch.equal(embeds[keep], text[keep])


def test_mismatch_error_names_the_sample(tiny_vlm):
    batch = _batch(tiny_vlm, (1, 1))
    ids = batch["input_ids"].clone()
    first = (ids[1] == tiny_vlm.image_token_id).nonzero()[0, 0]
    ids[1, first] = tiny_vlm.tokenizer.pad_token_id  # one placeholder too few in row 1
    batch["input_ids"] = ids
    with pytest.raises(
        ImageTokenMismatchError, match=r"sample 'cat-42' \(batch row 1\) has 15 image placeholder"
    ):
        tiny_vlm(**batch, sample_ids=["ok-1", "cat-42"])
    batch.pop("image_counts")
    with pytest.raises(ImageTokenMismatchError, match="31 image placeholder tokens but 2 image"):
        tiny_vlm(**batch)
    with pytest.raises(ImageTokenMismatchError, match="1 '<image>' markers but 2 images"):
        tiny_vlm.prepare_prompts(["<image> hi"], [[random_image(0), random_image(1)]])


def test_loss_uses_labels_and_gradients_reach_all_parts():
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_model_config())
    batch = _batch(model, (1, 0))
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    labels[labels == model.image_token_id] = IGNORE_INDEX
    out = model(**batch, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    for part in (model.vision, model.bridge, model.llm):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), part.__class__.__name__
    all_ignored = torch.full_like(labels, IGNORE_INDEX)
    all_ignored[0, -1] = labels[0, -1]
    loss_last = model(**batch, labels=all_ignored).loss
    logits = model(**batch).logits
    expected = torch.nn.functional.cross_entropy(logits[0, -2:-1], labels[0, -1:])
    assert torch.allclose(loss_last, expected, atol=1e-5)  # the shift happens once: logit t predicts t+1


def test_cached_and_uncached_generation_identical(tiny_vlm):
    batch = _batch(tiny_vlm)
    cached = tiny_vlm.generate(**batch, max_new_tokens=12, eos_token_ids=[-1])
    uncached = tiny_vlm.generate(**batch, max_new_tokens=12, use_cache=False, eos_token_ids=[-1])
    assert cached.shape == (3, 12)
    assert torch.equal(cached, uncached)
    sampled = [
        tiny_vlm.generate(
            **batch,
            max_new_tokens=8,
            do_sample=True,
            temperature=1.5,
            top_k=50,
            top_p=0.9,
            seed=7,
            eos_token_ids=[-1],
            use_cache=c,
        )
        for c in (True, False, True)
    ]
    assert torch.equal(sampled[0], sampled[1]) and torch.equal(sampled[0], sampled[2])
    other = tiny_vlm.generate(
        **batch, max_new_tokens=8, do_sample=True, temperature=1.5, seed=8, eos_token_ids=[-1]
    )
    assert not torch.equal(sampled[0], other)


def test_left_padding_does_not_change_a_rows_output(tiny_vlm):
    batch = _batch(tiny_vlm)
    together = tiny_vlm.generate(**batch, max_new_tokens=6, eos_token_ids=[-1])
    # row 1 of the mixed batch is the text-only prompt, left padded there; run it alone, unpadded
    prompt = tiny_vlm.prepare_prompts(["Question 1: what is it?"])
    alone = tiny_vlm.generate(**prompt, max_new_tokens=6, eos_token_ids=[-1])
    assert torch.equal(together[1], alone[0])


def test_eos_and_stop_strings_end_rows(tiny_vlm):
    batch = _batch(tiny_vlm, (1,))
    free = tiny_vlm.generate(**batch, max_new_tokens=10, eos_token_ids=[-1])[0]
    eos = int(free[3])
    stopped = tiny_vlm.generate(**batch, max_new_tokens=10, eos_token_ids=[eos])[0]
    first = (free == eos).nonzero()[0, 0]
    assert stopped.shape[0] == first + 1 and torch.equal(stopped, free[: first + 1])
    text = tiny_vlm.tokenizer.decode(free[:6], skip_special_tokens=False)
    stop = text[-2:]
    texts = tiny_vlm.generate_text(
        ["<image> Question 0: what is it?"],
        [[random_image(0)]],
        max_new_tokens=10,
        eos_token_ids=[-1],
        stop_strings=[stop],
    )
    assert stop not in texts[0] and len(tiny_vlm.tokenizer(texts[0])["input_ids"]) < 10


def test_save_and_load_round_trip(tiny_vlm, tmp_path):
    batch = _batch(tiny_vlm)
    out_dir = tmp_path / "model"
    (out_dir).mkdir()
    (out_dir / "stale.txt").write_text("old")  # an existing directory is replaced whole
    tiny_vlm.save_pretrained(out_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dir left behind
    assert not (out_dir / "stale.txt").exists()
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["model"]["llm"]["kind"] == "hf" and meta["model"]["llm"]["hf_config"]["model_type"] == "llama"
    loaded = VisionLanguageModel.from_pretrained(out_dir)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, tiny_vlm(**batch).logits)
    assert loaded.image_token_id == tiny_vlm.image_token_id


def test_from_pretrained_errors_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vlmkit model directory"):
        VisionLanguageModel.from_pretrained(tmp_path)


def test_labelled_positions_loss_equals_full_loss_and_gradients():
    from vlmkit.config import LoRAConfig, StageConfig
    from vlmkit.train.stages import apply_stage

    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(tiny_model_config())
    apply_stage(model, StageConfig(name="i", preset="instruct", lora=LoRAConfig(r=4, dropout=0.0)))
    batch = _batch(model, (1, 0))
    labels = batch["input_ids"].clone()
    labels[:, :8] = IGNORE_INDEX
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    full = model(**batch, labels=labels)
    fast = model(**batch, labels=labels, return_logits=False)
    assert fast.logits is None and torch.allclose(fast.loss, full.loss, atol=1e-6)
    full.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fast.loss.backward()
    assert grads and all(
        torch.allclose(p.grad, grads[n], atol=1e-6) for n, p in model.named_parameters() if n in grads
    )


def test_bridge_out_norm_starts_at_the_embedding_rms_and_survives_save(tmp_path):
    cfg = tiny_model_config()
    cfg.bridge.out_norm = True
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(cfg).eval()
    rms = model.llm.embeddings.weight.detach().float().pow(2).mean().sqrt()
    assert torch.allclose(model.bridge.norm.weight, rms.expand_as(model.bridge.norm.weight))
    with torch.no_grad():
        model.bridge.norm.weight.mul_(3.0)  # a trained gain, not the init, must come back
    batch = _batch(model)
    model.save_pretrained(tmp_path / "m")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.bridge.norm.weight, model.bridge.norm.weight)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
