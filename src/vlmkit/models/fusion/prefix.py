"""Prefix fusion (LLaVA): the visual tokens take the places of the image placeholder tokens in the text."""

from __future__ import annotations

import torch

from vlmkit.config import FusionConfig
from vlmkit.models.fusion.base import FUSIONS, Fusion, LLMInputs


@FUSIONS.register("prefix", tiny=lambda: {"prefix": FusionConfig(mode="prefix")})
class PrefixFusion(Fusion):
    """Placeholders filled by `masked_scatter`, in order: one placeholder per visual token."""

    def placeholders(self, visual_tokens: int) -> int:
        return visual_tokens

    def merge(
        self,
        is_image: torch.Tensor,
        embeds: torch.Tensor,
        visual: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
    ) -> LLMInputs:
        if visual is None:
            return LLMInputs(embeds)
        mask = is_image.unsqueeze(-1).expand_as(embeds)  # [B, T, D]
        return LLMInputs(embeds.masked_scatter(mask, visual.reshape(-1, visual.shape[-1]).to(embeds.dtype)))
