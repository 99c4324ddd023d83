"""Tiny-config tests for every registered bridge and the token reducers in front of them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmkit.config import BridgeConfig, ConfigError, to_dict
from vlmkit.models.bridges import (
    BRIDGES,
    REDUCE_MODES,
    Bridge,
    CrossAttnBridge,
    ReducedBridge,
    TokenReducer,
    build_bridge,
    sincos_pos_embed_2d,
)

VISION_DIM, LLM_DIM, BATCH, QUERIES = 32, 48, 2, 4
RESAMPLERS = {"qformer", "perceiver", "cross_attn"}
PER_PATCH = {"linear", "mlp", "vocab_mixture"}
# object_slots picks objects (a discrete choice of patches) and writes their boxes as digit tokens: gradients
# reach only the patches of detected objects (tests/test_word_bridges.py); M = slots x tokens per slot
SLOTS = {"object_slots"}


def make(kind: str, reduce: str = "none", **overrides) -> Bridge:
    """A bridge of `kind` with small settings (its own tiny config, if it declares one, and those of the
    settings below its config has)."""
    torch.manual_seed(0)
    tiny = BRIDGES.tiny_configs().get(kind) if kind in BRIDGES else None
    base = {k: v for k, v in to_dict(tiny).items() if k != "kind"} if tiny is not None else {}
    known = {f.name for f in dataclasses.fields(BridgeConfig.kind_class(kind))} if kind in BRIDGES else set()
    small = {k: v for k, v in {"num_queries": QUERIES, "num_layers": 2, "num_heads": 4}.items() if k in known}
    cfg = BridgeConfig.make(kind, **{**base, "reduce": reduce, **small, **overrides})
    return build_bridge(VISION_DIM, LLM_DIM, cfg)


def features(n: int, requires_grad: bool = False) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(BATCH, n, VISION_DIM, requires_grad=requires_grad)


def test_all_kinds_registered() -> None:
    assert set(BRIDGES.names()) >= RESAMPLERS | PER_PATCH | SLOTS


@pytest.mark.parametrize("n", [16, 64])
@pytest.mark.parametrize("reduce", REDUCE_MODES)
@pytest.mark.parametrize("kind", BRIDGES.names())
def test_output_shape_matches_num_tokens(kind: str, reduce: str, n: int) -> None:
    bridge = make(kind, reduce)
    out = bridge(features(n))
    assert out.shape == (BATCH, bridge.num_tokens(n), LLM_DIM)
    assert torch.isfinite(out).all()
    assert (bridge.vision_dim, bridge.llm_dim) == (VISION_DIM, LLM_DIM)
    reduced_n = n if reduce == "none" else n // 4
    if kind in RESAMPLERS:
        assert bridge.num_tokens(n) == QUERIES
    elif kind in SLOTS:
        assert bridge.num_tokens(n) == 4 * (2 + 8)  # 4 slots x (2 label groups + 4 coordinates x 2 digits)
    elif kind in PER_PATCH:
        assert bridge.num_tokens(n) == reduced_n
    if reduce == "none":
        assert not isinstance(bridge, ReducedBridge)
    else:
        assert isinstance(bridge, ReducedBridge)
        assert bridge.num_tokens(n) == bridge.inner.num_tokens(reduced_n)
        expected_inner_dim = VISION_DIM * 4 if reduce == "pixel_shuffle" else VISION_DIM
        assert bridge.inner.vision_dim == bridge.reducer.out_dim == expected_inner_dim
        # weights are saved by name: the inner bridge's parameters live under `inner.`
        assert all(key.startswith("inner.") for key in bridge.state_dict())


@pytest.mark.parametrize("reduce", REDUCE_MODES)
@pytest.mark.parametrize("kind", sorted(RESAMPLERS))
def test_resampler_token_count_independent_of_n(kind: str, reduce: str) -> None:
    bridge = make(kind, reduce)
    shapes = {bridge(features(n)).shape for n in (16, 64, 256)}
    assert shapes == {(BATCH, QUERIES, LLM_DIM)}


@pytest.mark.parametrize("reduce", REDUCE_MODES)
@pytest.mark.parametrize("kind", sorted(set(BRIDGES.names()) - SLOTS))
def test_gradients_reach_every_parameter_and_the_features(kind: str, reduce: str) -> None:
    bridge = make(kind, reduce)
    x = features(16, requires_grad=True)
    out = bridge(x)
    (out * torch.randn_like(out)).sum().backward()
    for name, param in bridge.named_parameters():
        assert param.grad is not None, f"{kind}/{reduce}: no gradient for {name}"
        assert param.grad.abs().sum() > 0, f"{kind}/{reduce}: zero gradient for {name}"
    assert x.grad is not None
    assert (x.grad.abs().sum(dim=-1) > 0).all(), "every input feature should receive gradient"


@pytest.mark.parametrize("kind", sorted(RESAMPLERS))
def test_hidden_dim_sets_resampler_width(kind: str) -> None:
    bridge = make(kind, hidden_dim=16)
    assert bridge(features(16)).shape == (BATCH, QUERIES, LLM_DIM)
    assert sum(p.numel() for p in bridge.parameters()) < sum(p.numel() for p in make(kind).parameters())


# ------------------------------------------------------------------------------------ token reducer
def grid_4x4() -> torch.Tensor:
    """[1, 16, 2]: token at (row r, col c) holds [10r + c, -(10r + c)]."""
    values = torch.tensor([10.0 * r + c for r in range(4) for c in range(4)])
    return torch.stack([values, -values], dim=-1).unsqueeze(0)


def test_pool_is_mean_of_each_block() -> None:
    out = TokenReducer("pool", 2, 2)(grid_4x4())
    # block (0,0) = {0, 1, 10, 11}; (0,1) = {2, 3, 12, 13}; (1,0) = {20, 21, 30, 31}; (1,1) = {22, 23, 32, 33}
    expected = torch.tensor([5.5, 7.5, 25.5, 27.5])
    assert torch.equal(out, torch.stack([expected, -expected], dim=-1).unsqueeze(0))


def test_pixel_shuffle_concatenates_block_row_major() -> None:
    reducer = TokenReducer("pixel_shuffle", 2, 2)
    out = reducer(grid_4x4())
    assert out.shape == (1, 4, 8) and reducer.out_dim == 8 and reducer.num_tokens(16) == 4
    # token (0,1) = features of (0,2), (0,3), (1,2), (1,3) in that order
    assert out[0, 1].tolist() == [2.0, -2.0, 3.0, -3.0, 12.0, -12.0, 13.0, -13.0]
    # token (1,0) = features of (2,0), (2,1), (3,0), (3,1)
    assert out[0, 2].tolist() == [20.0, -20.0, 21.0, -21.0, 30.0, -30.0, 31.0, -31.0]


def idefics3_pixel_shuffle(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """Idefics3Connector.pixel_shuffle from transformers, verbatim, as the reference order."""
    bsz, seq, embed_dim = x.size()
    height = width = int(seq**0.5)
    x = x.view(bsz, height, width, embed_dim)
    x = x.view(bsz, height, int(width / scale_factor), embed_dim * scale_factor)
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(bsz, int(width / scale_factor), int(height / scale_factor), embed_dim * (scale_factor**2))
    x = x.permute(0, 2, 1, 3)
    return x.reshape(bsz, int(seq / (scale_factor**2)), embed_dim * (scale_factor**2))


@pytest.mark.parametrize("factor", [2, 4])
def test_pixel_shuffle_matches_idefics3(factor: int) -> None:
    x = torch.randn(2, 64, 3)
    assert torch.equal(TokenReducer("pixel_shuffle", factor, 3)(x), idefics3_pixel_shuffle(x, factor))


@pytest.mark.parametrize("mode", ["pixel_shuffle", "pool"])
def test_reducer_rejects_non_square_and_indivisible_grids(mode: str) -> None:
    reducer = TokenReducer(mode, 4, 8)
    for call in (reducer.num_tokens, lambda n: reducer(torch.randn(1, n, 8))):
        with pytest.raises(ValueError, match="square patch grid.*N=15"):
            call(15)
        with pytest.raises(ValueError, match="grid side 6 .*not divisible by bridge.reduce_factor=4"):
            call(36)
    bridge = make("mlp", mode, reduce_factor=4)
    with pytest.raises(ValueError, match="not divisible"):
        bridge.num_tokens(36)
    with pytest.raises(ValueError, match="square"):
        bridge(features(15))


def test_unknown_reduce_mode_lists_modes() -> None:
    with pytest.raises(ValueError, match="known modes: none, pixel_shuffle, pool"):
        make("mlp", "shuffle")


# ------------------------------------------------------------------------------ cross_attn (Qwen-VL)
def test_cross_attn_key_positions_are_distinct_and_2d() -> None:
    bridge = make("cross_attn")
    assert isinstance(bridge, CrossAttnBridge)
    pos = bridge.key_pos_embed(16)  # [16, 48]
    assert pos.shape == (16, LLM_DIM)
    distances = torch.cdist(pos, pos) + torch.eye(16) * 1e9
    assert distances.min() > 1e-3, "two grid positions share an embedding"
    # row-major layout: index 1 is (row 0, col 1), index 4 is (row 1, col 0); transposed cells differ
    assert not torch.allclose(pos[1], pos[4])
    # first half encodes the column only, second half the row only
    grid = pos.reshape(4, 4, LLM_DIM)
    assert torch.allclose(grid[:, :, : LLM_DIM // 2], grid[:1, :, : LLM_DIM // 2].expand(4, -1, -1))
    assert torch.allclose(grid[:, :, LLM_DIM // 2 :], grid[:, :1, LLM_DIM // 2 :].expand(-1, 4, -1))
    # queries sit on a 2x2 grid in the same image frame: keys of a 2x2 grid get the query embeddings
    assert torch.allclose(bridge.key_pos_embed(QUERIES), bridge.query_pos)
    assert not torch.allclose(bridge.query_pos[0], bridge.query_pos[3])


def test_sincos_integer_grid_matches_closed_form() -> None:
    pos = sincos_pos_embed_2d(8, 3)  # [9, 8]: omega = [1, 1/100]
    row, col = 2, 1
    expected = [
        *[torch.sin(torch.tensor(col / w)).item() for w in (1.0, 100.0)],
        *[torch.cos(torch.tensor(col / w)).item() for w in (1.0, 100.0)],
        *[torch.sin(torch.tensor(row / w)).item() for w in (1.0, 100.0)],
        *[torch.cos(torch.tensor(row / w)).item() for w in (1.0, 100.0)],
    ]
    assert torch.allclose(pos[row * 3 + col], torch.tensor(expected), atol=1e-6)


def test_cross_attn_is_position_aware_but_set_resamplers_are_not() -> None:
    x = features(16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    for kind in RESAMPLERS:
        bridge = make(kind).eval()
        with torch.no_grad():
            same = torch.allclose(bridge(x), bridge(x[:, perm]), atol=1e-5)
        # only cross_attn adds position embeddings to the keys
        assert same == (kind != "cross_attn"), kind


def test_cross_attn_non_square_queries_and_features() -> None:
    bridge = make("cross_attn", num_queries=6)
    assert bridge(features(64)).shape == (BATCH, 6, LLM_DIM)
    assert torch.count_nonzero(bridge.query_pos) == 0
    with pytest.raises(ValueError, match="square patch grid.*N=15"):
        make("cross_attn")(features(15))


def test_default_num_queries_come_from_config() -> None:
    cfg = BridgeConfig.make("cross_attn", num_heads=4)
    assert build_bridge(VISION_DIM, LLM_DIM, cfg).num_tokens(64) == cfg.num_queries


def test_unknown_kind_lists_known_ids() -> None:
    with pytest.raises(ConfigError) as info:
        make("nope")
    for name in BRIDGES.names():
        assert name in str(info.value)


def test_perceiver_latents_attend_to_features_and_latents() -> None:
    bridge = make("perceiver")
    key_lengths: list[int] = []
    for layer in bridge.layers:
        layer.attn.register_forward_pre_hook(lambda _m, args: key_lengths.append(args[1].shape[1]))
    bridge(features(16))
    assert key_lengths == [16 + QUERIES] * 2


@pytest.mark.parametrize("reduce", ["none", "pixel_shuffle"])
def test_out_norm_gives_tokens_the_embedding_rms(reduce: str) -> None:
    plain = make("mlp", reduce)
    x = features(16) * 50  # large features: an unnormalized projector passes the scale on
    assert plain(x).pow(2).mean().sqrt() > 1.0
    torch.manual_seed(0)
    normed = build_bridge(VISION_DIM, LLM_DIM, BridgeConfig.make("mlp", reduce=reduce, out_norm=True), 0.13)
    out = normed(x)
    assert out.shape == plain(x).shape
    assert torch.allclose(out.pow(2).mean(-1).sqrt(), torch.full(out.shape[:2], 0.13), rtol=1e-3)
    out.sum().backward()  # the gain is learned
    assert normed.norm.weight.grad is not None and normed.num_tokens(16) == plain.num_tokens(16)
