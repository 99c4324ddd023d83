"""The CPU decode kernels (infer/kernels.py, csrc/decode.cpp): they build where a compiler is found; the attention
matches an fp64 reference as closely as SDPA does (fp32 and bf16, grouped-query heads, strided cache views, rows of
different lengths); RoPE and the cache writes are PyTorch's bit for bit, the residual add + RMSNorm and SiLU * up
within one rounding; and the served model keeps its answers with them."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vlmkit.infer import kernels as cpu_kernels
from vlmkit.infer.engine import Engine
from vlmkit.infer.generate import Predictor
from vlmkit.infer.prepack import available, fuse_projections, prepack_linears

from conftest import lively_model
from test_lean import _requests, _serve


@pytest.fixture(scope="module")
def kernel():
    reason = cpu_kernels.unavailable()
    if reason is not None:
        pytest.skip(f"the kernels cannot be built here: {reason}")
    loaded = cpu_kernels.load()
    assert loaded is not None, f"a compiler is here but the kernels did not build: {cpu_kernels.why_not()}"
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
    out = kernel.decode_attention(q, k, v, valid, scale)
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
    assert torch.equal(kernel.decode_attention(q, k2, v2, valid, scale), out)
    assert int(valid.min()) < length or length == 1  # the garbage was there


def test_the_kernel_refuses_what_it_cannot_do(kernel):
    q, k, v, valid = _case(2, 2, 2, 16, 5, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="unit stride"):
        kernel.decode_attention(q, k.transpose(2, 3), v, valid, 0.25)
    with pytest.raises(RuntimeError, match="one dtype"):
        kernel.decode_attention(q, k.double(), v, valid, 0.25)
    with pytest.raises(RuntimeError, match="one key count per row"):
        kernel.decode_attention(q, k, v, valid[:1], 0.25)
    qkv = torch.randn(2, (4 + 2 * 2) * 16)
    keys = torch.zeros(3, 2, 8, 16)
    with pytest.raises(RuntimeError, match="position beyond the cache"):
        kernel.rope_attention(
            qkv, torch.ones(2, 16), torch.zeros(2, 16), keys, keys.clone(), torch.tensor([0, 8]), 4, 2, 0.25
        )
    assert not cpu_kernels.supports(512, 2, torch.float32)
    assert not cpu_kernels.supports(64, 2, torch.float16)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of b's last place (bf16: 8 significant bits; fp32: 24)."""
    bits = 8 if b.dtype == torch.bfloat16 else 24
    exponent = torch.frexp(b.double())[1]
    return (a.double() - b.double()).abs() / torch.ldexp(
        torch.ones_like(b, dtype=torch.float64), exponent - bits
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_cache_writes_are_pytorchs_and_attention_follows(kernel, dtype):
    g = torch.Generator().manual_seed(1)
    rows, heads, kv_heads, dim, capacity = 3, 6, 2, 16, 12
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    pos = torch.tensor([4, 0, 9])
    angle = pos[:, None].double() * torch.linspace(0.1, 1.5, dim // 2, dtype=torch.float64)[None]
    angle = torch.cat([angle, angle], dim=-1)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    keys = torch.randn(rows + 1, kv_heads, capacity, dim, generator=g).to(dtype)
    values = torch.randn(rows + 1, kv_heads, capacity, dim, generator=g).to(dtype)
    ref_k, ref_v = keys.clone(), values.clone()
    out = kernel.rope_attention(qkv, cos, sin, keys, values, pos, heads, kv_heads, dim**-0.5)
    # what the lean forward does op by op (transformers' RoPE, each op rounded to the dtype)
    x = qkv.view(rows, heads + 2 * kv_heads, dim)
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    roped = x * cos[:, None] + rotated * sin[:, None]
    q, k, v = roped[:, :heads], roped[:, heads : heads + kv_heads], x[:, heads + kv_heads :]
    for b in range(rows):
        ref_k[b, :, pos[b]] = k[b]
        ref_v[b, :, pos[b]] = v[b]
    assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)  # bit for bit, nothing else touched
    q = q.reshape(rows, kv_heads, heads // kv_heads, dim)
    exact = _reference(q, ref_k[:rows], ref_v[:rows], pos + 1, dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    assert (out.view(rows, kv_heads, -1, dim).double() - exact).abs().max() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_rms_norm_and_silu_are_pytorchs_within_one_rounding(kernel, dtype):
    g = torch.Generator().manual_seed(2)
    hidden = (3 * torch.randn(5, 96, generator=g)).to(dtype)
    delta = torch.randn(5, 96, generator=g).to(dtype)
    weight = (1 + 0.3 * torch.randn(96, generator=g)).to(dtype)
    total, normed = kernel.add_rms_norm(hidden, delta, weight, 1e-5)
    ref_total = hidden + delta
    assert torch.equal(total, ref_total)
    variance = ref_total.float().pow(2).mean(-1, keepdim=True)
    ref = weight * (ref_total.float() * torch.rsqrt(variance + 1e-5)).to(dtype)
    # sums in another order, exp and rsqrt within an ulp of libm's: a rounding or two (fp32: a few ulps)
    ulps = 2 if dtype == torch.bfloat16 else 8
    assert _ulps(normed, ref).max() <= ulps
    gate_up = (4 * torch.randn(5, 2 * 40, generator=g)).to(dtype)
    act = kernel.silu_and_mul(gate_up)
    ref_act = F.silu(gate_up[:, :40]) * gate_up[:, 40:]
    assert act.shape == (5, 40) and _ulps(act, ref_act).max() <= ulps


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
    assert plain.lean.kernels is None and fast.lean.kernels is kernel and fast.lean.fused
    assert tokens == plain_tokens and len(calls) == len(plain_calls) > 10
    for a, b in zip(calls, plain_calls):
        tol = 1e-4 if dtype == torch.float32 else 0.05 * float(b.float().std())
        assert (a.float() - b.float()).abs().max() <= tol
    assert Engine(predictor, cpu_kernels=False).lean.kernels is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_rope_and_quick_gelu_are_pytorchs(kernel, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, 16, generator=g).to(dtype)  # [B, t, heads, D]
    angle = torch.rand(2, 5, 16, generator=g, dtype=torch.float64) * 6
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    rotated = torch.cat([-x[..., 8:], x[..., :8]], dim=-1)
    ref = (x * cos[:, :, None] + rotated * sin[:, :, None])[:, :, :5]
    assert torch.equal(kernel.rope(x, cos, sin, 5), ref)  # bit for bit
    h = (3 * torch.randn(4, 300, generator=g)).to(dtype)
    ref_gelu = h * torch.sigmoid(1.702 * h)
    # exp within an ulp or two of PyTorch's: bf16 one rounding; fp32 a few ulps where sigmoid is tiny
    assert _ulps(kernel.quick_gelu(h), ref_gelu).max() <= (2 if dtype == torch.bfloat16 else 32)
    tower = torch.nn.Sequential(torch.nn.Linear(4, 4), type("QuickGELUActivation", (torch.nn.Module,), {})())
    assert cpu_kernels.swap_activations(tower, kernel) == 1 and isinstance(tower[1], cpu_kernels.QuickGELU)


@pytest.fixture(scope="module")
def linear_kernel(kernel):
    if not kernel.has_bf16_linear():
        pytest.skip("built without AVX512-BF16: the served linears stay oneDNN's")
    return kernel


def _exact_and_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """x @ w.T + b in fp64, and what one bf16 rounding of an fp32 sum may miss it by."""
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    magnitude = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    return exact, exact.abs() * 2**-8 + magnitude * 1e-5


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])  # both tile shapes (<= 16 rows, more), partial tiles
def test_the_bf16_linear_is_as_close_to_exact_as_onednn(linear_kernel, rows):
    g = torch.Generator().manual_seed(rows)
    for out, inp in [(37, 64), (960, 576), (50, 1536)]:  # output sizes off the 16-column blocks too
        w = torch.randn(out, inp, generator=g).to(torch.bfloat16)
        b = torch.randn(out, generator=g).to(torch.bfloat16)
        x = torch.randn(2, rows, inp, generator=g).to(torch.bfloat16)
        y = linear_kernel.linear(x, linear_kernel.pack_linear(w), b, out)
        assert y.shape == (2, rows, out) and y.dtype == torch.bfloat16
        exact, bound = _exact_and_bound(x, w, b)
        assert ((y.double() - exact).abs() <= bound).all()
        onednn = F.linear(x, w, b).double()
        assert (y.double() - exact).abs().max() <= 1.01 * (onednn - exact).abs().max()
    x = (
        torch.randn(64, rows, generator=g).to(torch.bfloat16).T
    )  # a transposed (non-contiguous) input, no bias
    w = torch.randn(20, 64, generator=g).to(torch.bfloat16)
    exact, bound = _exact_and_bound(x, w, None)
    assert (
        (linear_kernel.linear(x, linear_kernel.pack_linear(w), None, 20).double() - exact).abs() <= bound
    ).all()


def test_the_bf16_linear_refuses_what_it_cannot_do(linear_kernel):
    w = torch.randn(20, 64).to(torch.bfloat16)
    packed = linear_kernel.pack_linear(w)
    with pytest.raises(RuntimeError, match="K must be even"):
        linear_kernel.pack_linear(torch.randn(20, 63).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="bf16 input"):
        linear_kernel.linear(torch.randn(3, 64), packed, None, 20)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        linear_kernel.linear(torch.randn(3, 62).to(torch.bfloat16), packed, None, 20)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        linear_kernel.linear(torch.randn(3, 64).to(torch.bfloat16), packed, None, 40)


def test_served_answers_are_the_same_with_the_bf16_linear(linear_kernel, monkeypatch):
    """Packed and fused linears of a bf16 model for vlmkit's linear: the same greedy answers as with oneDNN's,
    logits as close as bf16 allows; an odd input size and fp32 weights stay with oneDNN; AMX CPUs keep oneDNN."""
    from vlmkit.infer.prepack import PackedLinear

    def served(ops):
        model = lively_model({"num_attention_heads": 4, "num_key_value_heads": 2}).to(torch.bfloat16)
        fuse_projections(model.llm, ops)
        prepack_linears(model, ops)
        return model

    onednn, ours = served(None), served(linear_kernel)
    packed = [m for m in ours.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.kernels is linear_kernel for m in packed)
    assert ours.llm.layers[0].self_attn.q_proj.group.kernels is linear_kernel
    requests = _requests()
    _, expected, expected_calls = _serve(Predictor(onednn), True, requests, kernel=True)
    _, tokens, calls = _serve(Predictor(ours), True, requests, kernel=True)
    assert tokens == expected and len(calls) == len(expected_calls)
    for a, b in zip(calls, expected_calls):
        assert (a.float() - b.float()).abs().max() <= 0.05 * float(b.float().std())
    odd = torch.nn.Sequential(torch.nn.Linear(7, 4).to(torch.bfloat16), torch.nn.Linear(4, 4))
    prepack_linears(odd, linear_kernel)
    assert odd[0].kernels is None and odd[1].kernels is None  # odd input size; fp32 weights
    x = torch.randn(3, 7).to(torch.bfloat16)
    assert torch.allclose(
        odd(x).float(),
        (x.float() @ odd[0].weight.float().T + odd[0].bias.float()) @ odd[1].weight.T + odd[1].bias,
        atol=0.05,
    )
    monkeypatch.setattr(cpu_kernels, "_has_amx", lambda: True)
    assert cpu_kernels.linear_kernels() is None
    monkeypatch.setattr(cpu_kernels, "_has_amx", lambda: False)
    assert cpu_kernels.linear_kernels() is linear_kernel


def test_a_bf16_served_model_is_packed_for_the_bf16_linear(linear_kernel, tmp_path, monkeypatch):
    from vlmkit.infer.prepack import PackedLinear
    from vlmkit.infer.server import build_predictor

    monkeypatch.setattr(cpu_kernels, "_has_amx", lambda: False)
    lively_model().save_pretrained(tmp_path / "model")

    def kernels_of(predictor):
        return {m.kernels for m in predictor.model.modules() if isinstance(m, PackedLinear)}

    assert kernels_of(build_predictor(tmp_path / "model", dtype="bf16", prepack=True)) == {linear_kernel}
    assert kernels_of(build_predictor(tmp_path / "model", dtype="bf16", prepack=True, cpu_kernels=False)) == {
        None
    }
    assert kernels_of(build_predictor(tmp_path / "model", dtype="fp32", prepack=True)) == {None}


def test_the_kernels_let_other_python_threads_run(kernel):
    """Each op releases the GIL while it computes (as PyTorch's ops do): the server's HTTP thread keeps streaming
    tokens meanwhile (docs/serving.md: inter-token p95 28 -> 14 ms with 8 clients)."""
    import threading
    import time

    hidden = torch.randn(3000, 4096)
    delta, weight = torch.randn_like(hidden), torch.randn(4096)
    ticks: list[float] = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    thread = threading.Thread(target=tick)
    thread.start()
    try:
        time.sleep(0.01)
        windows, results = [], []
        for _ in range(3):
            start = time.perf_counter()
            results.append(
                kernel.add_rms_norm(hidden, delta, weight, 1e-5)
            )  # freed later: outside the window
            windows.append((start, time.perf_counter()))
    finally:
        stop.set()
        thread.join()
    inside = [sum(a < t < b for t in ticks) for a, b in windows]
    # with the GIL held the other thread cannot run at all during a call (tens of ms here)
    assert all(b - a > 0.01 for a, b in windows) and max(inside) >= 5, (inside, windows)


def test_the_kernels_build_for_a_cpu_without_avx512_bf16(kernel):
    """On an AVX2-only CPU (most laptops) the extension still builds: the decode kernels work and the bf16 linear
    says it is absent (the served linears stay oneDNN's) instead of failing the whole build (a build: ~40 s, cached)."""
    from torch.utils import cpp_extension

    flags = [f for f in cpu_kernels.FLAGS if f != "-march=native"] + ["-march=haswell"]
    module = cpp_extension.load(
        name=f"{cpu_kernels.build_name()}_haswell",
        sources=[str(s) for s in cpu_kernels.SOURCES],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
    )
    assert not module.has_bf16_linear()
    with pytest.raises(RuntimeError, match="without AVX512-BF16"):
        module.pack_linear(torch.randn(4, 8).to(torch.bfloat16))
    gate_up = torch.randn(3, 8)
    assert torch.allclose(module.silu_and_mul(gate_up), F.silu(gate_up[:, :4]) * gate_up[:, 4:], atol=1e-6)
