"""Modality bridges: `forward(features[B,N,Dv]) -> tokens[B,M,Dl]`, built from (vision_dim, llm_dim, cfg)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmkit.config import BridgeConfig
from vlmkit.models import word_bridges  # noqa: F401  (registers vocab_mixture and object_slots)
from vlmkit.models.bridge_base import BRIDGES, Bridge


@dataclass
class MLPBridgeConfig(BridgeConfig):
    """`mlp`: `depth` linear layers with GELU between them; `hidden_dim` (default: the LLM's width)."""

    depth: int = 2
    hidden_dim: int | None = None


@dataclass
class ResamplerConfig(BridgeConfig):
    """A resampler: `num_queries` learned queries (the visual tokens per image), `num_layers` blocks of
    `num_heads` heads at width `hidden_dim` (default: the bridge's own choice)."""

    num_queries: int = 32
    num_layers: int = 2
    num_heads: int = 8
    hidden_dim: int | None = None


def _tiny(kind: str, cls: type[BridgeConfig] = BridgeConfig, **fields: object) -> Callable[[], dict]:
    return lambda: {kind: cls(kind=kind, **fields)}


@dataclass
class CrossAttnConfig(BridgeConfig):
    """`cross_attn` (Qwen-VL): one cross-attention layer of `num_heads` heads from `num_queries` queries on a 2D
    grid, width `hidden_dim` (default: the LLM's width)."""

    num_queries: int = 32
    num_heads: int = 8
    hidden_dim: int | None = None


_TINY_RESAMPLER = {"num_queries": 4, "num_layers": 1, "num_heads": 2}


@BRIDGES.register("linear", tiny=_tiny("linear"))
class LinearBridge(Bridge):
    """One linear projection (LLaVA-1)."""

    def __init__(self, vision_dim: int, llm_dim: int, cfg: BridgeConfig) -> None:
        super().__init__(vision_dim, llm_dim, cfg)
        self.proj = nn.Linear(vision_dim, llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)  # [B, N, Dl]


@BRIDGES.register("mlp", config=MLPBridgeConfig, tiny=_tiny("mlp", MLPBridgeConfig))
class MLPBridge(Bridge):
    """Linear layers with GELU between them (LLaVA-1.5 `mlp2x_gelu` at depth 2)."""

    def __init__(self, vision_dim: int, llm_dim: int, cfg: BridgeConfig) -> None:
        super().__init__(vision_dim, llm_dim, cfg)
        if cfg.depth < 1:
            raise ValueError(f"bridge.depth must be >= 1, got {cfg.depth}")
        hidden = cfg.hidden_dim or llm_dim
        dims = [vision_dim] + [hidden] * (cfg.depth - 1) + [llm_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(d_in, d_out))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)  # [B, N, Dl]


def _grid_side(n: int, who: str) -> int:
    """Side g of a square g*g patch grid holding `n` features; ValueError when `n` is not a square."""
    side = math.isqrt(n) if n > 0 else 0
    if side * side != n:
        raise ValueError(
            f"{who} needs features from a square patch grid (N = g*g, row-major), got N={n}; "
            "drop CLS/prefix tokens before the bridge"
        )
    return side


def _check_heads(dim: int, heads: int, who: str) -> None:
    if heads < 1 or dim % heads:
        raise ValueError(f"{who}: width {dim} is not divisible by bridge.num_heads={heads}")


def _feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Pre-norm GELU MLP used inside the resamplers (Flamingo `FeedForward`)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


# ------------------------------------------------------------------------------------- Q-Former
class QFormerLayer(nn.Module):
    """BLIP-2 Q-Former layer, post-norm as in BERT.

    x = LN(x + SelfAttn(x)); x = LN(x + CrossAttn(x, features)); x = LN(x + MLP(x)).
    """

    def __init__(self, dim: int, kv_dim: int, heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_self = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm_ff = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """queries [B, Q, H], features [B, N, Dv] -> queries [B, Q, H]."""
        queries = self.norm_self(queries + self.self_attn(queries, queries, queries, need_weights=False)[0])
        attended = self.cross_attn(queries, features, features, need_weights=False)[0]  # [B, Q, H]
        queries = self.norm_cross(queries + attended)
        return self.norm_ff(queries + self.ff(queries))


@BRIDGES.register(
    "qformer", config=ResamplerConfig, tiny=_tiny("qformer", ResamplerConfig, **_TINY_RESAMPLER)
)
class QFormerBridge(Bridge):
    """BLIP-2 Q-Former: `num_queries` learned queries, `num_layers` post-norm layers (self-attention over
    the queries, cross-attention to the image features, MLP), then a linear projection to the LLM.

    Width is `cfg.hidden_dim` (default: vision_dim); unlike BLIP-2 every layer cross-attends (BLIP-2 does
    so every other layer) and there is no text branch. M = num_queries for any N.
    """

    def __init__(self, vision_dim: int, llm_dim: int, cfg: BridgeConfig) -> None:
        super().__init__(vision_dim, llm_dim, cfg)
        if cfg.num_queries < 1 or cfg.num_layers < 1:
            raise ValueError("qformer needs bridge.num_queries >= 1 and bridge.num_layers >= 1")
        width = cfg.hidden_dim or vision_dim
        _check_heads(width, cfg.num_heads, "qformer")
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, width) * 0.02)  # [Q, H]
        self.norm_queries = nn.LayerNorm(width)  # BLIP-2 embeddings LayerNorm
        self.norm_vision = nn.LayerNorm(vision_dim)  # BLIP-2 `ln_vision`
        self.layers = nn.ModuleList(
            QFormerLayer(width, vision_dim, cfg.num_heads) for _ in range(cfg.num_layers)
        )
        self.proj = nn.Linear(width, llm_dim)

    def num_tokens(self, n: int) -> int:
        return self.cfg.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.norm_vision(features)  # [B, N, Dv]
        x = self.norm_queries(self.queries).unsqueeze(0).expand(features.shape[0], -1, -1)  # [B, Q, H]
        for layer in self.layers:
            x = layer(x, features)
        return self.proj(x)  # [B, Q, Dl]


# ---------------------------------------------------------------------------- Perceiver Resampler
class PerceiverLayer(nn.Module):
    """Flamingo resampler layer (pre-norm): latents attend to concat([features; latents]), then an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)
        self.ff = _feed_forward(dim)

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """latents [B, L, H], features [B, N, H] -> latents [B, L, H]."""
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(features), q], dim=1)  # [B, N + L, H]
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.ff(latents)


@BRIDGES.register(
    "perceiver", config=ResamplerConfig, tiny=_tiny("perceiver", ResamplerConfig, **_TINY_RESAMPLER)
)
class PerceiverBridge(Bridge):
    """Flamingo Perceiver Resampler: `num_queries` learned latents, `num_layers` pre-norm layers whose
    keys/values come from both the features and the latents, a final LayerNorm, a linear projection.

    Width is `cfg.hidden_dim` (default: vision_dim; features are projected when it differs). No temporal
    or position embeddings. M = num_queries for any N.
    """

    def __init__(self, vision_dim: int, llm_dim: int, cfg: BridgeConfig) -> None:
        super().__init__(vision_dim, llm_dim, cfg)
        if cfg.num_queries < 1 or cfg.num_layers < 1:
            raise ValueError("perceiver needs bridge.num_queries >= 1 and bridge.num_layers >= 1")
        width = cfg.hidden_dim or vision_dim
        _check_heads(width, cfg.num_heads, "perceiver")
        self.in_proj = nn.Linear(vision_dim, width) if width != vision_dim else nn.Identity()
        self.latents = nn.Parameter(torch.randn(cfg.num_queries, width))  # [L, H]
        self.layers = nn.ModuleList(PerceiverLayer(width, cfg.num_heads) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, llm_dim)

    def num_tokens(self, n: int) -> int:
        return self.cfg.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.in_proj(features)  # [B, N, H]
        x = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)  # [B, L, H]
        for layer in self.layers:
            x = layer(x, features)
        return self.proj(self.norm(x))  # [B, L, Dl]


# ------------------------------------------------------------------------- Qwen-VL cross-attention
def sincos_pos_embed_2d(dim: int, side: int, ref_side: int | None = None) -> torch.Tensor:
    """Fixed 2D sin-cos embedding [side*side, dim] of a row-major side×side grid (MAE / Qwen-VL layout:
    first half encodes the column, second half the row; each half is [sin | cos]).

    Positions are cell centres measured in units of a `ref_side` grid over the same image
    (default: `side`, i.e. integer coordinates 0..side-1), so grids of different sizes share one frame;
    this is the closed form of Qwen-VL's interpolation of its query-grid table to the key grid.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    ref = side if ref_side is None else ref_side
    coords = (torch.arange(side, dtype=torch.float64) + 0.5) * (ref / side) - 0.5  # [side]
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [dim/4]
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [side, side] each

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # [side*side, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [side*side, dim/2]

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # [side*side, dim]


@BRIDGES.register(
    "cross_attn",
    config=CrossAttnConfig,
    tiny=_tiny("cross_attn", CrossAttnConfig, num_queries=4, num_heads=2),
)
class CrossAttnBridge(Bridge):
    """Qwen-VL resampler: one cross-attention layer from `num_queries` learned queries to the features.

    Keys get 2D sin-cos position embeddings of the g×g feature grid (any square N; ValueError otherwise);
    queries get those of a sqrt(M)×sqrt(M) grid when M is a square (none otherwise), in the same image
    frame. LayerNorms `ln_kv` (features), `ln_q` (queries) and `ln_post` (output) as in Qwen-VL; width is
    `cfg.hidden_dim` (default: llm_dim, as in Qwen-VL) then a bias-free projection to llm_dim.
    M = `cfg.num_queries` (the Qwen-VL recipe sets 256, a 16×16 query grid).
    """

    def __init__(self, vision_dim: int, llm_dim: int, cfg: BridgeConfig) -> None:
        super().__init__(vision_dim, llm_dim, cfg)
        if cfg.num_queries < 1:
            raise ValueError("cross_attn needs bridge.num_queries >= 1")
        width = cfg.hidden_dim or llm_dim
        _check_heads(width, cfg.num_heads, "cross_attn")
        if width % 4:
            raise ValueError(
                f"cross_attn width must be divisible by 4 for 2D sin-cos embeddings, got {width}"
            )
        side = math.isqrt(cfg.num_queries)
        self.query_side = side if side * side == cfg.num_queries else None
        self.query = nn.Parameter(nn.init.trunc_normal_(torch.empty(cfg.num_queries, width), std=0.02))
        query_pos = (
            sincos_pos_embed_2d(width, side) if self.query_side else torch.zeros(cfg.num_queries, width)
        )
        self.register_buffer("query_pos", query_pos, persistent=False)  # [M, W], fixed
        self.kv_proj = nn.Linear(vision_dim, width, bias=False) if vision_dim != width else nn.Identity()
        self.ln_kv = nn.LayerNorm(width)
        self.ln_q = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, cfg.num_heads, batch_first=True)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, llm_dim, bias=False)

    def num_tokens(self, n: int) -> int:
        return self.cfg.num_queries

    def key_pos_embed(self, n: int) -> torch.Tensor:
        """Position embeddings [N, W] for the keys of a square N = g*g feature grid."""
        side = _grid_side(n, "cross_attn bridge")
        return sincos_pos_embed_2d(self.query_pos.shape[1], side, self.query_side or side)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        key_pos = self.key_pos_embed(features.shape[1]).to(features.device, features.dtype)  # [N, W]
        kv = self.ln_kv(self.kv_proj(features))  # [B, N, W]
        q = self.ln_q(self.query) + self.query_pos.to(kv.dtype)  # [M, W]
        q = q.unsqueeze(0).expand(features.shape[0], -1, -1)  # [B, M, W]
        out = self.attn(q, kv + key_pos, kv, need_weights=False)[0]  # [B, M, W]
        return self.proj(self.ln_post(out))  # [B, M, Dl]


# -------------------------------------------------------------------------------- token reduction
REDUCE_MODES = ("none", "pixel_shuffle", "pool")


class TokenReducer(nn.Module):
    """Shrinks a row-major g×g feature grid by `factor` per side before the bridge.

    `pixel_shuffle` (space-to-depth, Idefics3/SmolVLM): [B, g*g, D] -> [B, (g/f)^2, D*f*f]; the channels
    of an output token are its f×f block's features concatenated in row-major order within the block
    ((0,0), (0,1), ..., (f-1,f-1)), which is Idefics3's order. `pool`: 2D average pooling,
    [B, g*g, D] -> [B, (g/f)^2, D]. `none`: identity.
    """

    def __init__(self, mode: str, factor: int, dim: int) -> None:
        super().__init__()
        if mode not in REDUCE_MODES:
            raise ValueError(f"unknown bridge.reduce '{mode}'; known modes: {', '.join(REDUCE_MODES)}")
        if factor < 1:
            raise ValueError(f"bridge.reduce_factor must be >= 1, got {factor}")
        self.mode, self.factor, self.in_dim = mode, factor, dim
        self.out_dim = dim * factor * factor if mode == "pixel_shuffle" else dim

    def _out_side(self, n: int) -> int:
        side = _grid_side(n, f"bridge.reduce='{self.mode}'")
        if side % self.factor:
            raise ValueError(
                f"bridge.reduce='{self.mode}': grid side {side} (N={n}) is not divisible by "
                f"bridge.reduce_factor={self.factor}"
            )
        return side // self.factor

    def num_tokens(self, n: int) -> int:
        """Tokens after reduction: (g/f)^2 for an N = g*g grid (N for `none`)."""
        return n if self.mode == "none" else self._out_side(n) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x
        b, n, d = x.shape
        f, s = self.factor, self._out_side(n)
        grid = x.reshape(b, s, f, s, f, d)  # [B, g/f, f(row in block), g/f, f(col in block), D]
        if self.mode == "pool":
            return grid.mean(dim=(2, 4)).reshape(b, s * s, d)  # [B, (g/f)^2, D]
        blocks = grid.permute(0, 1, 3, 2, 4, 5)  # [B, g/f, g/f, f, f, D]
        return blocks.reshape(b, s * s, f * f * d)  # [B, (g/f)^2, D*f*f]


class ReducedBridge(Bridge):
    """`inner(reducer(x))`: token reduction (`cfg.reduce`) in front of the bridge named by `cfg.kind`."""

    def __init__(self, vision_dim: int, llm_dim: int, cfg: BridgeConfig) -> None:
        super().__init__(vision_dim, llm_dim, cfg)
        self.reducer = TokenReducer(cfg.reduce, cfg.reduce_factor, vision_dim)
        self.inner: Bridge = BRIDGES.get(cfg.kind)(self.reducer.out_dim, llm_dim, cfg)

    def num_tokens(self, n: int) -> int:
        return self.inner.num_tokens(self.reducer.num_tokens(n))

    def bind_llm(self, llm: Any) -> None:
        self.inner.bind_llm(llm)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        reduced = self.reducer(features)  # [B, N', D']
        return self.inner(reduced)  # [B, M, Dl]


class NormedBridge(Bridge):
    """`norm(inner(x))`: RMSNorm on every output token, its gain initialized to `scale` (`cfg.out_norm`)."""

    def __init__(self, inner: Bridge, llm_dim: int, cfg: BridgeConfig, scale: float = 1.0) -> None:
        super().__init__(inner.vision_dim, llm_dim, cfg)
        self.inner = inner
        self.norm = nn.RMSNorm(llm_dim, eps=1e-6)
        nn.init.constant_(self.norm.weight, scale)

    def num_tokens(self, n: int) -> int:
        return self.inner.num_tokens(n)

    def bind_llm(self, llm: Any) -> None:
        self.inner.bind_llm(llm)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.inner(features))  # [B, M, Dl]


def build_bridge(vision_dim: int, llm_dim: int, cfg: BridgeConfig, embed_rms: float = 1.0) -> Bridge:
    """Build the bridge named by `cfg.kind`, with optional token reduction (`cfg.reduce`) in front of it and an
    optional output RMSNorm (`cfg.out_norm`) whose gain starts at `embed_rms` (the LLM's input-embedding RMS)."""
    cfg = cfg.resolved()
    bridge_cls = BRIDGES.get(cfg.kind)
    bridge = (
        bridge_cls(vision_dim, llm_dim, cfg)
        if cfg.reduce == "none"
        else ReducedBridge(vision_dim, llm_dim, cfg)
    )
    return NormedBridge(bridge, llm_dim, cfg, embed_rms) if cfg.out_norm else bridge
