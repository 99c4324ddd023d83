"""Flamingo-style gated cross-attention fusion: tanh-gated blocks inserted before frozen LLM decoder layers.

The images reach the gated layers as a keyword argument of the LLM call (`vlm_media`, a `Media`), which
transformers' decoders hand to every layer; the wrapped layers take it, the others ignore it. Nothing is kept
between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vlmkit.config import FusionConfig
from vlmkit.models.fusion.base import FUSIONS, Fusion, LLMInputs
from vlmkit.models.llm import DecoderLayerWrapper, LanguageModel

MEDIA_KWARG = "vlm_media"


class GatedCrossAttentionBlock(nn.Module):
    """LayerNorm → cross-attention to the latest image → tanh-gated residual; LayerNorm → FF → gated residual.

    Both gates start at 0, so a fresh block is an exact identity. Tokens with no image at or before them
    (media_index -1) are left exactly unchanged by both sub-blocks.
    """

    def __init__(self, dim: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"fusion.heads ({heads}) must be >= 1 and divide the LLM hidden size ({dim})")
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_mult * dim, bias=False),
            nn.GELU(),
            nn.Linear(ff_mult * dim, dim, bias=False),
        )
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def keys_values(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """media [B, I, M, D] -> keys, values [B, H, I*M, D/H] each."""
        b, i, m, d = media.shape
        kv = self.kv_proj(media.reshape(b, i * m, d))  # [B, I*M, 2D]
        kv = kv.view(b, i * m, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [2, B, H, I*M, D/H]
        return kv[0], kv[1]

    def attend(
        self,
        x: torch.Tensor,
        media: torch.Tensor,
        media_index: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, T, D] (normed), media [B, I, M, D], media_index [B, T] -> attention output [B, T, D].

        Each token attends only to the M tokens of image `media_index`; rows with -1 get exactly zero.
        """
        b, t, d = x.shape
        num_images, m = media.shape[1], media.shape[2]
        q = self.q_proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)  # [B, H, T, D/H]
        k, v = kv if kv is not None else self.keys_values(media)  # [B, H, I*M, D/H]
        key_image = torch.arange(num_images, device=x.device).repeat_interleave(m)  # [I*M]
        no_image = (media_index < 0)[..., None]  # [B, T, 1]
        # Rows with no image may attend anywhere (finite softmax, no NaN); their output is zeroed below.
        allowed = (key_image == media_index[..., None]) | no_image  # [B, T, I*M]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # [B, H, T, D/H]
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, d))  # [B, T, D]
        return out.masked_fill(no_image, 0.0)

    def forward(
        self,
        x: torch.Tensor,
        media: torch.Tensor,
        media_index: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, T, D], media [B, I, M, D], media_index [B, T] -> x [B, T, D] with gated visual information."""
        has_image = (media_index >= 0)[..., None]  # [B, T, 1]
        x = x + self.attn_gate.tanh() * self.attend(self.attn_norm(x), media, media_index, kv)
        return x + torch.where(has_image, self.ff_gate.tanh() * self.ff(x), 0.0)


@dataclass
class Media:
    """The images one LLM call cross-attends to.

    media [B, I, M, D] (each row's images, zero-padded); media_index [B, T_total]: for every token so far, the
    index of the latest image of its own sample at or before it (-1: none) — a call over the last t tokens uses
    the last t columns. `kv` holds each block's projected keys/values for reuse across decode steps (no grad);
    `seen` counts the gated layers that read this object (a decoder that drops keyword arguments shows 0).
    """

    media: torch.Tensor
    media_index: torch.Tensor
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    seen: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        if self.media.dim() != 4 or self.media_index.dim() != 2 or len(self.media) != len(self.media_index):
            raise ValueError(
                f"media must be [B, I, M, D] and media_index [B, T]; got {tuple(self.media.shape)} and "
                f"{tuple(self.media_index.shape)}"
            )


def media_by_row(
    visual: torch.Tensor, is_image: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group per-image tokens by row for cross-attention.

    visual [I, M, D] (images in text order), is_image [B, T] (one marker per image) ->
    media [B, max_I, M, D] and media_index [B, T]: index of the latest image at or before each token (-1: none).
    With `position_ids` [B, T] (packed rows: a sample starts where its position is 0), that image must belong to
    the token's own sample: a sample never sees the images of the samples packed before it.
    """
    counts = is_image.sum(dim=1)  # [B]
    b, max_i = is_image.shape[0], int(counts.max().item()) if len(counts) else 0
    media = visual.new_zeros(b, max(max_i, 1), *visual.shape[1:])
    start = 0
    for row, n in enumerate(counts.tolist()):
        media[row, :n] = visual[start : start + n]
        start += n
    seen = is_image.long().cumsum(dim=1)  # [B, T] images at or before each token
    media_index = seen - 1  # [B, T]
    if position_ids is not None:
        starts = position_ids == 0  # [B, T]
        # images before the start of each token's sample (carried forward from the latest start)
        before = torch.where(starts, seen - is_image.long(), 0).cummax(dim=1).values  # [B, T]
        media_index = torch.where(seen > before, media_index, -1)
    return media, media_index


class XAttnDecoderLayer(DecoderLayerWrapper):
    """One LLM decoder layer with gated cross-attention (owned by `XAttnFusion.blocks`) on its input first."""

    owner = "xattn=fusion.blocks"

    @property
    def xattn(self) -> GatedCrossAttentionBlock:
        return self._block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Same signature and return value as the wrapped layer; hidden_states [B, T, D] go through xattn first
        when the call carries `vlm_media`."""
        media = kwargs.pop(MEDIA_KWARG, None)
        if media is None:
            return self.layer(*args, **kwargs)
        if args:
            args = (self.cross_attend(args[0], media), *args[1:])
        else:
            kwargs["hidden_states"] = self.cross_attend(kwargs["hidden_states"], media)
        return self.layer(*args, **kwargs)

    def cross_attend(self, hidden: torch.Tensor, media: Media) -> torch.Tensor:
        """hidden [B, t, D] (the call's last t tokens) -> hidden [B, t, D], computed in the block's dtype."""
        t = hidden.shape[1]
        if media.media_index.shape[0] != hidden.shape[0] or media.media_index.shape[1] < t:
            raise ValueError(
                f"media_index {tuple(media.media_index.shape)} does not cover hidden states {tuple(hidden.shape[:2])}"
            )
        media.seen[0] += 1
        block = self._block
        dtype = block.q_proj.weight.dtype
        images = media.media.to(dtype)
        kv = None
        if not torch.is_grad_enabled():  # generation: project each image once, reuse across steps
            kv = media.kv.get(self.index)
            if kv is None:
                kv = media.kv[self.index] = block.keys_values(images)
        index = media.media_index[:, -t:]  # [B, t]
        return block(hidden.to(dtype), images, index, kv).to(hidden.dtype)


@dataclass
class XAttnFusionConfig(FusionConfig):
    """`xattn`: a gated cross-attention block (`heads` heads, feed-forward `ff_mult` x wide) before every
    `every`-th decoder layer of the LLM."""

    every: int = 1
    heads: int = 4
    ff_mult: int = 2


@FUSIONS.register(
    "xattn",
    config=XAttnFusionConfig,
    tiny=lambda: {"xattn": XAttnFusionConfig(mode="xattn", every=1, heads=2)},
)
class XAttnFusion(Fusion):
    """Inserts a `GatedCrossAttentionBlock` before every `cfg.every`-th decoder layer of `llm` (in place) and owns
    the blocks (`blocks["<layer index>"]`). Each image is one placeholder token in the text; every token attends
    to the latest image of its own sample."""

    def __init__(self, llm: LanguageModel, cfg: XAttnFusionConfig) -> None:
        super().__init__(llm, cfg)
        if cfg.every < 1:
            raise ValueError(f"fusion.every must be >= 1, got {cfg.every}")
        layers = llm.layers
        if any(isinstance(layer, XAttnDecoderLayer) for layer in layers):
            raise ValueError("the LLM already has cross-attention layers")
        chosen = [i for i in range(len(layers)) if (i + 1) % cfg.every == 0]
        if not chosen:
            raise ValueError(f"fusion.every={cfg.every} selects none of the LLM's {len(layers)} layers")
        dim = llm.hidden_size
        self.blocks = nn.ModuleDict(
            {str(i): GatedCrossAttentionBlock(dim, cfg.heads, cfg.ff_mult) for i in chosen}
        )
        for i in chosen:
            layers[i] = XAttnDecoderLayer(layers[i], self.blocks[str(i)], i)

    def placeholders(self, visual_tokens: int) -> int:
        return 1

    def merge(
        self,
        is_image: torch.Tensor,
        embeds: torch.Tensor,
        visual: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
    ) -> LLMInputs:
        if visual is None:
            return LLMInputs(embeds)
        return LLMInputs(embeds, {MEDIA_KWARG: Media(*media_by_row(visual, is_image, position_ids))})

    def advance(self, kwargs: dict[str, Any], cached: bool) -> dict[str, Any]:
        """The new token of each row sees the image its previous token saw."""
        media = kwargs.get(MEDIA_KWARG)
        if media is None:
            return kwargs
        index = torch.cat([media.media_index, media.media_index[:, -1:]], dim=1)
        return {**kwargs, MEDIA_KWARG: replace(media, media_index=index)}

    def window(self, kwargs: dict[str, Any], start: int, end: int) -> dict[str, Any]:
        """Tokens [start, end) see the images their own `media_index` columns name (projected keys shared)."""
        media = kwargs.get(MEDIA_KWARG)
        if media is None:
            return kwargs
        return {**kwargs, MEDIA_KWARG: replace(media, media_index=media.media_index[:, start:end])}

    def join(self, parts: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
        """Rows of several calls in one Media: images zero-padded to the most any row has (a padded image is never
        named by a row's `media_index`), rows without images get index -1; only the last `media_index` column is
        kept (each row goes on one token per call), and the projected keys/values are joined, not recomputed."""
        medias = [p.get(MEDIA_KWARG) for p in parts]
        present = [m for m in medias if m is not None]
        if not present:
            return {}
        ref = present[0]
        num_images = max(m.media.shape[1] for m in present)
        media, index = [], []
        for m, n in zip(medias, sizes):
            if m is None:
                media.append(ref.media.new_zeros(n, num_images, *ref.media.shape[2:]))
                index.append(
                    torch.full((n, 1), -1, dtype=ref.media_index.dtype, device=ref.media_index.device)
                )
            else:
                media.append(F.pad(m.media, (0, 0, 0, 0, 0, num_images - m.media.shape[1])))
                index.append(m.media_index[:, -1:])
        kv = {}
        for block in set.intersection(*(set(m.kv) for m in present)):
            tokens = num_images * ref.media.shape[2]  # keys per row after padding: I * M
            keys, values = [], []
            for m, n in zip(medias, sizes):
                if m is None:
                    k = ref.kv[block][0].new_zeros(
                        n, ref.kv[block][0].shape[1], tokens, ref.kv[block][0].shape[3]
                    )
                    keys.append(k)
                    values.append(torch.zeros_like(k))
                else:
                    k, v = m.kv[block]  # [n, H, I_m * M, D/H]
                    keys.append(F.pad(k, (0, 0, 0, tokens - k.shape[2])))
                    values.append(F.pad(v, (0, 0, 0, tokens - v.shape[2])))
            kv[block] = (torch.cat(keys), torch.cat(values))
        return {MEDIA_KWARG: Media(torch.cat(media), torch.cat(index), kv)}

    def select(self, kwargs: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
        media = kwargs.get(MEDIA_KWARG)
        if media is None:
            return kwargs
        kv = {block: (k[rows], v[rows]) for block, (k, v) in media.kv.items()}
        return {**kwargs, MEDIA_KWARG: Media(media.media[rows], media.media_index[rows], kv)}

    def check(self, kwargs: dict[str, Any]) -> None:
        media = kwargs.get(MEDIA_KWARG)
        if media is not None and media.seen[0] == 0:
            raise RuntimeError(
                "xattn fusion: the images never reached the cross-attention layers — this LLM's decoder does not "
                "pass keyword arguments on to its layers (transformers' Llama/Qwen/Mistral-style decoders do)"
            )
