"""Flamingo-style gated cross-attention fusion: tanh-gated blocks inserted before frozen LLM decoder layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vlmkit.config import FusionConfig
from vlmkit.models.llm import DecoderLayerWrapper, LanguageModel


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


class MediaState:
    """The media the fusion layers attend to in the current forward (shared by `XAttnFusion` and its wrappers)."""

    def __init__(self) -> None:
        self.media: torch.Tensor | None = None  # [B, I, M, D]
        self.media_index: torch.Tensor | None = None  # [B, T]
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per-block keys/values, no-grad reuse

    def set(self, media: torch.Tensor | None, media_index: torch.Tensor | None) -> None:
        if (media is None) != (media_index is None):
            raise ValueError("set_media needs both media and media_index, or neither")
        if media is not None and (
            media.dim() != 4 or media_index.dim() != 2 or len(media) != len(media_index)
        ):
            raise ValueError(
                f"set_media expects media [B, I, M, D] and media_index [B, T]; got {tuple(media.shape)} "
                f"and {tuple(media_index.shape)}"
            )
        if media is not self.media:
            self.kv = {}
        self.media, self.media_index = media, media_index


class XAttnDecoderLayer(DecoderLayerWrapper):
    """One LLM decoder layer with gated cross-attention (owned by `XAttnFusion.blocks`) on its input first."""

    owner = "xattn=fusion.blocks"

    def __init__(
        self, layer: nn.Module, xattn: GatedCrossAttentionBlock, index: int, state: MediaState
    ) -> None:
        super().__init__(layer, xattn, index)
        object.__setattr__(self, "_state", state)  # shared with the fusion module, not a submodule

    @property
    def xattn(self) -> GatedCrossAttentionBlock:
        return self._block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Same signature and return value as the wrapped layer; hidden_states [B, T, D] go through xattn first."""
        state = self._state
        if state.media is None:
            return self.layer(*args, **kwargs)
        if args:
            args = (self.cross_attend(args[0], state), *args[1:])
        else:
            kwargs["hidden_states"] = self.cross_attend(kwargs["hidden_states"], state)
        return self.layer(*args, **kwargs)

    def cross_attend(self, hidden: torch.Tensor, state: MediaState) -> torch.Tensor:
        """hidden [B, T, D] -> hidden [B, T, D], computed in the block's dtype."""
        if state.media_index.shape != hidden.shape[:2]:
            raise ValueError(
                f"media_index {tuple(state.media_index.shape)} does not match hidden states "
                f"{tuple(hidden.shape[:2])}: call set_media with one index per token of this forward"
            )
        block = self._block
        dtype = block.q_proj.weight.dtype
        media = state.media.to(dtype)
        kv = None
        if not torch.is_grad_enabled():  # generation: project each image once, reuse across steps
            kv = state.kv.get(self.index)
            if kv is None:
                kv = state.kv[self.index] = block.keys_values(media)
        return block(hidden.to(dtype), media, state.media_index, kv).to(hidden.dtype)


class XAttnFusion(nn.Module):
    """Inserts a `GatedCrossAttentionBlock` before every `cfg.every`-th decoder layer of `llm` (in place).

    Owns the blocks (`blocks["<layer index>"]`) and the media state the wrapped layers read; the VLM calls
    `set_media` before an LLM call and `clear` after it. With no media set, every wrapper is a pass-through.
    """

    def __init__(self, llm: LanguageModel, cfg: FusionConfig) -> None:
        super().__init__()
        if cfg.every < 1:
            raise ValueError(f"fusion.every must be >= 1, got {cfg.every}")
        layers = llm.layers
        if any(isinstance(layer, XAttnDecoderLayer) for layer in layers):
            raise ValueError("the LLM already has cross-attention layers")
        chosen = [i for i in range(len(layers)) if (i + 1) % cfg.every == 0]
        if not chosen:
            raise ValueError(f"fusion.every={cfg.every} selects none of the LLM's {len(layers)} layers")
        self._state = MediaState()
        dim = llm.hidden_size
        self.blocks = nn.ModuleDict(
            {str(i): GatedCrossAttentionBlock(dim, cfg.heads, cfg.ff_mult) for i in chosen}
        )
        for i in chosen:
            layers[i] = XAttnDecoderLayer(layers[i], self.blocks[str(i)], i, self._state)

    def set_media(self, media: torch.Tensor | None, media_index: torch.Tensor | None) -> None:
        """media [B, I, M, D] (visual tokens per image, rows zero-padded); media_index [B, T]: for each token
        of the next forward, the index of the latest image at or before it (-1: none). None: pass-through."""
        self._state.set(media, media_index)

    def clear(self) -> None:
        """Drop the media (and cached keys/values): the wrapped layers become pass-throughs."""
        self._state.set(None, None)

    @property
    def has_media(self) -> bool:
        return self._state.media is not None
