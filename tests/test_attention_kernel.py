"""The decode attention kernel (infer/attention_kernel.py, csrc/decode_attention.cpp): it builds where a compiler is
found, matches an fp64 reference as closely as SDPA does (fp32 and bf16, grouped-query heads, strided cache views,
rows of different lengths), and the served model keeps its answers with it."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vlmkit.infer import attention_kernel
from vlmkit.infer.engine import Engine
from vlmkit.infer.generate import Predictor
from vlmkit.infer.prepack import available, fuse_projections, prepack_linears

from conftest import lively_model
from test_lean import _requests, _serve


@pytest.fixture(scope="module")
def kernel():
    reason = attention_kernel.unavailable()
    if reason is not None:
        pytest.skip(f"the kernel cannot be built here: {reason}")
    loaded = attention_kernel.load()
    assert loaded is not None, (
        f"a compiler is here but the kernel did not build: {attention_kernel.why_not()}"
    )
    return loaded


def _case(rows: int, kv_heads: int, rep: int, dim: int, length: int, dtype: torch.dtype, seed: int):
    """q [B, KV, R, D]; k, v: views [B, KV, L, D] of larger cache buffers (as the engine's slots); valid [B]."""
    g = torch.Generator().manual_seed(seed)
    cache_k = torch.randn(rows + 1, kv_heads, length + 37, dim, generator=g).to(dtype)
    cache_v = torch.randn(rows + 1, kv_heads, length + 37, dim, generator=g).to(dtype)
    q = (2 * torch.randn(rows, kv_heads, rep, dim, generator=g)).to(dtype)
    valid = torch.randint(1, length + 1, (rows,), generator=g)
    valid[0] = length
    return q, cache_k[:rows, :, :length], cache_v[:rows, :, :length], valid


def _reference(q, k, v, valid, scale, dtype=torch.float64):
    mask = (torch.arange(k.shape[2])[None, :] < valid[:, None])[:, None, None]  # [B, 1, 1, L]
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [(8, 3, 3, 64, 150), (3, 2, 2, 8, 17), (2, 4, 1, 128, 40), (2, 2, 4, 20, 9), (2, 1, 1, 96, 1)],
    ids=["smollm2", "tiny", "mha-128", "odd-dim", "one-key"],
)
def test_the_kernel_is_as_close_to_exact_attention_as_sdpa(kernel, dtype, shape):
    rows, kv_heads, rep, dim, length = shape
    q, k, v, valid = _case(rows, kv_heads, rep, dim, length, dtype, seed=sum(shape))
    scale = dim**-0.5
    exact = _reference(q, k, v, valid, scale)
    out = kernel(q, k, v, valid, scale)
    assert out.dtype == dtype and out.shape == q.shape
    sdpa = _reference(q, k, v, valid, scale, dtype).to(torch.float64)  # SDPA in the served dtype
    err, sdpa_err = (out.double() - exact).abs().max(), (sdpa - exact).abs().max()
    if dtype == torch.float32:
        assert err < 1e-5
    else:  # one rounding to bf16 of values |x| < ~4: at most 2^-7 * 4 / 2
        assert err <= max(1.5 * sdpa_err, 2**-6)
    # a key beyond a row's count changes nothing: garbage past every row's keys
    k2, v2 = k.clone(), v.clone()
    for row, n in enumerate(valid.tolist()):
        k2[row, :, n:] = 1e4
        v2[row, :, n:] = float("nan")
    assert torch.equal(kernel(q, k2, v2, valid, scale), out)
    assert int(valid.min()) < length or length == 1  # the garbage was there


def test_the_kernel_refuses_what_it_cannot_do(kernel):
    q, k, v, valid = _case(2, 2, 2, 16, 5, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="unit stride"):
        kernel(q, k.transpose(2, 3), v, valid, 0.25)
    with pytest.raises(RuntimeError, match="one dtype"):
        kernel(q, k.double(), v, valid, 0.25)
    with pytest.raises(RuntimeError, match="one key count per row"):
        kernel(q, k, v, valid[:1], 0.25)
    assert not attention_kernel.supports(512, 2, torch.float32)
    assert not attention_kernel.supports(64, 2, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_served_model_keeps_its_answers_with_the_kernel(kernel, dtype):
    """Rows joining a running batch, prompts in chunks, packed and fused linears: the same greedy answers as
    with SDPA, and logits as close as the dtype allows."""
    model = lively_model({"num_attention_heads": 4, "num_key_value_heads": 2}).to(dtype)
    if available():
        fuse_projections(model.llm)
        prepack_linears(model)
    predictor = Predictor(model)
    requests = _requests()
    plain, plain_tokens, plain_calls = _serve(predictor, True, requests, kernel=False)
    fast, tokens, calls = _serve(predictor, True, requests, kernel=True)
    assert plain.lean.kernel is None and fast.lean.kernel is kernel
    assert tokens == plain_tokens and len(calls) == len(plain_calls) > 10
    for a, b in zip(calls, plain_calls):
        tol = 1e-4 if dtype == torch.float32 else 0.05 * float(b.float().std())
        assert (a.float() - b.float()).abs().max() <= tol
    assert Engine(predictor, attention_kernel=False).lean.kernel is None
