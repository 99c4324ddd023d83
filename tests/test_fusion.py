"""Fusion modes are registered strategies: a new one is one class + one registration, and the decode loop and
the forward need no edit for it."""

from __future__ import annotations

import pytest
import torch

from vlmkit.config import ConfigError, FusionConfig
from vlmkit.models.fusion import FUSIONS, Fusion, LLMInputs
from vlmkit.models.vlm import VisionLanguageModel

from conftest import random_image, tiny_model_config


class PooledFusion(Fusion):
    """A test fusion: one placeholder per image, filled with the mean of the image's visual tokens."""

    def placeholders(self, visual_tokens: int) -> int:
        return 1

    def merge(self, is_image, embeds, visual, position_ids=None) -> LLMInputs:
        if visual is None:
            return LLMInputs(embeds)
        pooled = visual.mean(dim=1)  # [I, D]
        mask = is_image.unsqueeze(-1).expand_as(embeds)
        return LLMInputs(embeds.masked_scatter(mask, pooled.to(embeds.dtype)))


@pytest.fixture
def pooled_model():
    FUSIONS.register("pooled-test")(PooledFusion)
    try:
        torch.manual_seed(0)
        yield VisionLanguageModel.from_config(
            tiny_model_config(fusion=FusionConfig.make("pooled-test"))
        ).eval()
    finally:
        FUSIONS.unregister("pooled-test")


def test_a_registered_fusion_runs_forward_and_generate(pooled_model):
    model = pooled_model
    assert model.tokens_per_image() == 1
    images = [[random_image(1)], [random_image(2)]]
    batch = model.prepare_prompts(["<image>\nWhat is it?", "<image>\nWhat is it?"], images)
    assert int((batch["input_ids"] == model.image_token_id).sum()) == 2
    with torch.no_grad():
        logits = model(**batch).logits
    assert not torch.allclose(logits[0, -1], logits[1, -1])  # the images reach the LLM
    out = model.generate(**batch, max_new_tokens=3, eos_token_ids=[-1])
    assert out.shape == (2, 3)
    cached = model.generate(**batch, max_new_tokens=3, eos_token_ids=[-1], use_cache=False)
    assert torch.equal(out, cached)


def test_unknown_fusion_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known fusion modes: prefix, xattn"):
        VisionLanguageModel.from_config(tiny_model_config(fusion=FusionConfig.make("nope")))
