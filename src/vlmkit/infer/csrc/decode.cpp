// CPU kernels for one decode step of a Llama-family decoder (one new token per row), built by
// vlmkit/infer/kernels.py (torch.utils.cpp_extension, -O3 -march=native); see that module for why and how they are
// checked. Elementwise results are rounded to the tensors' dtype where PyTorch's own ops round (bf16: after every
// op), so they match transformers' forward up to the order of floating-point sums.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline float bf16_to_float(uint16_t x) {
  uint32_t b = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline uint16_t float_to_bf16(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  b += 0x7fffu + ((b >> 16) & 1u);                     // round to nearest even, as PyTorch does
  return uint16_t(b >> 16);
}

inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) { return bf16_to_float(*p); }
inline void store(float* p, float x) { *p = x; }
inline void store(uint16_t* p, float x) { *p = float_to_bf16(x); }

// exp(x) for x <= 0: Cephes expf (range reduction by ln 2, degree-6 polynomial, ~1 ulp), vectorizable
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t e = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, 4);
  return y * scale;
}

template <typename T>
T* ptr(torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(!t.is_cuda(), name, ": CPU tensors only");
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16 || t.scalar_type() == torch::kFloat, name, ": bf16 or fp32");
}

// f(T{}) with T the element type the loops read and write: uint16_t for a bf16 tensor, float for fp32.
template <typename F>
void by_dtype(const torch::Tensor& t, F&& f) {
  if (t.scalar_type() == torch::kBFloat16)
    f(uint16_t{});
  else
    f(float{});
}

constexpr int64_t kMaxDim = 256;
constexpr int64_t kMaxRep = 16;

// One (row, kv head): R queries [R, D] against the first n keys/values (rows of D, `ks`/`vs` apart). DIM > 0: the
// head size as a compile-time constant (the loops vectorize fully); 0: `dim` at run time (any size up to kMaxDim).
template <typename T, int64_t DIM>
void one_head(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
              int64_t R, int64_t dim, int64_t n, int64_t ks, int64_t vs, float scale, float* __restrict__ scores) {
  constexpr int64_t W = DIM > 0 ? DIM : kMaxDim;
  const int64_t D = DIM > 0 ? DIM : dim;
  alignas(64) float qf[kMaxRep][W];
  alignas(64) float acc[kMaxRep][W];
  alignas(64) float row[W];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) qf[r][d] = load(q + r * D + d) * scale;
  for (int64_t j = 0; j < n; ++j) {
    const T* kr = k + j * ks;
    for (int64_t d = 0; d < D; ++d) row[d] = load(kr + d);
    for (int64_t r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += qf[r][d] * row[d];
      scores[r * n + j] = s;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float* s = scores + r * n;
    float m = -INFINITY;
    for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      s[j] = exp_nonpositive(s[j] - m);
      sum += s[j];
    }
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < n; ++j) s[j] *= inv;
    for (int64_t d = 0; d < D; ++d) acc[r][d] = 0.f;
  }
  for (int64_t j = 0; j < n; ++j) {
    const T* vr = v + j * vs;
    for (int64_t d = 0; d < D; ++d) row[d] = load(vr + d);
    for (int64_t r = 0; r < R; ++r) {
      const float p = scores[r * n + j];
      for (int64_t d = 0; d < D; ++d) acc[r][d] += p * row[d];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) store(out + r * D + d, acc[r][d]);
}

template <typename T, int64_t DIM>
void run(const T* q, const T* k, const T* v, const int64_t* valid, T* out, int64_t B, int64_t H, int64_t R,
         int64_t D, int64_t L, const int64_t* kst, const int64_t* vst, float scale) {
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(R * L);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const int64_t n = std::min<int64_t>(valid[b], L);
      if (n <= 0) {  // no key: zeros (SDPA would give NaN)
        for (int64_t i = 0; i < R * D; ++i) store(out + bh * R * D + i, 0.f);
        continue;
      }
      one_head<T, DIM>(q + bh * R * D, k + b * kst[0] + h * kst[1], v + b * vst[0] + h * vst[1],
                       out + bh * R * D, R, D, n, kst[2], vst[2], scale, scores.data());
    }
  });
}

template <typename T>
void dispatch(const T* q, const T* k, const T* v, const int64_t* valid, T* out, int64_t B, int64_t H, int64_t R,
              int64_t D, int64_t L, const int64_t* kst, const int64_t* vst, float scale) {
  switch (D) {  // the usual head sizes as constants; any other size up to kMaxDim at run time
    case 64: return run<T, 64>(q, k, v, valid, out, B, H, R, D, L, kst, vst, scale);
    case 128: return run<T, 128>(q, k, v, valid, out, B, H, R, D, L, kst, vst, scale);
    case 80: return run<T, 80>(q, k, v, valid, out, B, H, R, D, L, kst, vst, scale);
    case 96: return run<T, 96>(q, k, v, valid, out, B, H, R, D, L, kst, vst, scale);
    default: return run<T, 0>(q, k, v, valid, out, B, H, R, D, L, kst, vst, scale);
  }
}

}  // namespace

// q [B, H, R, D] (R queries per key/value head), k/v [B, H, L, D] (any strides but unit on D), valid [B]: keys
// 0..valid[b]-1 of row b are attended -> [B, H, R, D] in q's dtype. fp32 arithmetic throughout.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor valid, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-d");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v: one dtype");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k, v need unit stride on the head dim");
  TORCH_CHECK(q.size(2) <= kMaxRep, "at most ", kMaxRep, " queries per key/value head");
  TORCH_CHECK(q.size(3) <= kMaxDim, "head size at most ", kMaxDim);
  TORCH_CHECK(valid.numel() == q.size(0), "one key count per row");
  check_cpu(q, "decode_attention");
  auto qc = q.contiguous();
  auto vl = valid.to(torch::kLong).contiguous();
  auto out = torch::empty_like(qc);
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), L = k.size(2);
  const int64_t kst[3] = {k.stride(0), k.stride(1), k.stride(2)}, vst[3] = {v.stride(0), v.stride(1), v.stride(2)};
  by_dtype(qc, [&](auto tag) {
    using T = decltype(tag);
    dispatch<T>(ptr<T>(qc), ptr<T>(k), ptr<T>(v), vl.data_ptr<int64_t>(), ptr<T>(out), B, H, R, D, L, kst, vst,
                float(scale));
  });
  return out;
}

namespace {

// x rounded to T's precision (bf16: round to nearest even; fp32: itself)
template <typename T>
inline float round_to(float x);
template <>
inline float round_to<float>(float x) { return x; }
template <>
inline float round_to<uint16_t>(float x) { return bf16_to_float(float_to_bf16(x)); }

// RoPE of one head x [D] at one position (cos/sin [D]) into dst, as transformers computes it:
// x*cos + rotate_half(x)*sin, each op rounded to T
template <typename T>
inline void rope_head(const T* x, const T* c, const T* sn, T* dst, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float rot = d < half ? -load(x + d + half) : load(x + d - half);
    store(dst + d, round_to<T>(load(x + d) * load(c + d)) + round_to<T>(rot * load(sn + d)));
  }
}

template <typename T>
void rope_write_attend(const T* qkv, const T* cos, const T* sin, T* keys, T* values, const int64_t* pos, T* out,
                       int64_t B, int64_t H, int64_t KV, int64_t D, const int64_t* cst, float scale) {
  const int64_t R = H / KV, width = (H + 2 * KV) * D;
  std::vector<T> q(B * H * D);
  // RoPE on q and k as transformers computes it (x*cos + rotate_half(x)*sin, each op rounded), new k/v -> cache
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* row = qkv + b * width;
      const T* c = cos + b * D;
      const T* sn = sin + b * D;
      for (int64_t h = 0; h < H + KV; ++h) {
        const T* x = row + h * D;
        T* dst = h < H ? q.data() + (b * H + h) * D : keys + b * cst[0] + (h - H) * cst[1] + pos[b] * cst[2];
        rope_head(x, c, sn, dst, D);
      }
      for (int64_t h = 0; h < KV; ++h) {
        const T* x = row + (H + KV + h) * D;
        T* dst = values + b * cst[0] + h * cst[1] + pos[b] * cst[2];
        std::memcpy(dst, x, D * sizeof(T));
      }
    }
  });
  const int64_t kst[3] = {cst[0], cst[1], cst[2]};
  std::vector<int64_t> valid(B);
  for (int64_t b = 0; b < B; ++b) valid[b] = pos[b] + 1;
  // the queries of a key/value head are consecutive heads: q [B, KV, R, D] as decode_attention takes it
  const int64_t L = *std::max_element(valid.begin(), valid.end());
  dispatch<T>(q.data(), keys, values, valid.data(), out, B, KV, R, D, L, kst, kst, scale);
}

template <typename T>
void add_rms(const T* hidden, const T* delta, const T* weight, T* sum, T* normed, int64_t N, int64_t D, float eps) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(D);
    for (int64_t n = begin; n < end; ++n) {
      float sq = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        s[d] = round_to<T>(load(hidden + n * D + d) + load(delta + n * D + d));
        sq += s[d] * s[d];
      }
      const float r = 1.f / std::sqrt(sq / float(D) + eps);
      for (int64_t d = 0; d < D; ++d) {
        store(sum + n * D + d, s[d]);
        store(normed + n * D + d, round_to<T>(s[d] * r) * load(weight + d));
      }
    }
  });
}

template <typename T>
void silu_mul(const T* gate_up, T* out, int64_t N, int64_t I) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* g = gate_up + n * 2 * I;
      for (int64_t i = 0; i < I; ++i) {
        const float x = load(g + i);
        const float e = exp_nonpositive(-std::fabs(x));  // exp(-|x|): the vectorizable exp, no overflow
        const float act = round_to<T>(x >= 0.f ? x / (1.f + e) : x * e / (1.f + e));  // x / (1 + exp(-x))
        store(out + n * I + i, act * load(g + I + i));
      }
    }
  });
}

}  // namespace

// One decode step's attention block between the q/k/v projection and the output projection: qkv [B, (H+2KV)*D]
// (one new token per row, rows in cache slots 0..B-1), cos/sin [B, D] (the rotary module's, for each row's
// position), keys/values [S, KV, C, D] cache buffers written at pos [B] -> attention output [B, H*D].
torch::Tensor rope_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor keys,
                             torch::Tensor values, torch::Tensor pos, int64_t heads, int64_t kv_heads, double scale) {
  for (auto* t : {&qkv, &cos, &sin, &keys, &values}) check_cpu(*t, "rope_attention");
  const int64_t B = qkv.size(0), D = keys.size(3);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (heads + 2 * kv_heads) * D, "qkv must be [B, (H + 2 KV) * D]");
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= kMaxRep && D <= kMaxDim && D % 2 == 0, "head layout");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes(), "cache buffers");
  TORCH_CHECK(keys.size(0) >= B && keys.size(1) == kv_heads, "cache slots / heads");
  auto p = pos.to(torch::kLong).contiguous();
  TORCH_CHECK(p.numel() == B, "one position per row");
  const int64_t* pp = p.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(pp[b] >= 0 && pp[b] < keys.size(2), "position beyond the cache");
  auto x = qkv.contiguous(), c = cos.contiguous(), sn = sin.contiguous();
  TORCH_CHECK(x.scalar_type() == keys.scalar_type() && c.scalar_type() == x.scalar_type(), "one dtype");
  TORCH_CHECK(c.numel() == B * D && sn.numel() == B * D, "cos/sin must be [B, D]");
  auto out = torch::empty({B, heads * D}, x.options());
  const int64_t cst[3] = {keys.stride(0), keys.stride(1), keys.stride(2)};
  by_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    rope_write_attend<T>(ptr<T>(x), ptr<T>(c), ptr<T>(sn), ptr<T>(keys), ptr<T>(values), pp, ptr<T>(out), B, heads,
                         kv_heads, D, cst, float(scale));
  });
  return out;
}

// hidden + delta (the residual) and its RMSNorm times weight, as transformers' LlamaRMSNorm: [N, D] each.
std::vector<torch::Tensor> add_rms_norm(torch::Tensor hidden, torch::Tensor delta, torch::Tensor weight, double eps) {
  for (auto* t : {&hidden, &delta, &weight}) check_cpu(*t, "add_rms_norm");
  TORCH_CHECK(hidden.sizes() == delta.sizes() && hidden.size(-1) == weight.numel(), "shapes");
  TORCH_CHECK(hidden.scalar_type() == delta.scalar_type() && weight.scalar_type() == hidden.scalar_type(), "dtype");
  auto h = hidden.contiguous(), dl = delta.contiguous(), w = weight.contiguous();
  auto sum = torch::empty_like(h), normed = torch::empty_like(h);
  const int64_t D = h.size(-1), N = h.numel() / D;
  by_dtype(h, [&](auto tag) {
    using T = decltype(tag);
    add_rms<T>(ptr<T>(h), ptr<T>(dl), ptr<T>(w), ptr<T>(sum), ptr<T>(normed), N, D, float(eps));
  });
  return {sum, normed};
}

// The gated MLP's activation: gate_up [..., 2I] (gate, then up) -> silu(gate) * up [..., I].
torch::Tensor silu_and_mul(torch::Tensor gate_up) {
  check_cpu(gate_up, "silu_and_mul");
  auto g = gate_up.contiguous();
  const int64_t I = g.size(-1) / 2, N = g.numel() / g.size(-1);
  auto sizes = g.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, g.options());
  by_dtype(g, [&](auto tag) {
    using T = decltype(tag);
    silu_mul<T>(ptr<T>(g), ptr<T>(out), N, I);
  });
  return out;
}

// RoPE on the first `count` heads of x [N, heads, D] (q then k of a fused projection) with cos/sin [N, D] of each
// position, as transformers computes it (x*cos + rotate_half(x)*sin, each op rounded) -> [N, count, D].
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t count) {
  for (auto* t : {&x, &cos, &sin}) check_cpu(*t, "rope");
  TORCH_CHECK(x.dim() >= 2 && x.size(-2) >= count, "x must be [..., heads >= count, D]");
  const int64_t D = x.size(-1), heads = x.size(-2), N = x.numel() / (heads * D);
  TORCH_CHECK(D % 2 == 0 && cos.numel() == N * D && sin.numel() == N * D, "cos/sin must be [N, D]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "one dtype");
  auto xc = x.contiguous(), c = cos.contiguous(), sn = sin.contiguous();
  auto sizes = xc.sizes().vec();
  sizes[sizes.size() - 2] = count;
  auto out = torch::empty(sizes, xc.options());
  auto body = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = ptr<T>(xc);
    const T* cp = ptr<T>(c);
    const T* sp = ptr<T>(sn);
    T* op = ptr<T>(out);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        for (int64_t h = 0; h < count; ++h)
          rope_head(xp + (n * heads + h) * D, cp + n * D, sp + n * D, op + (n * count + h) * D, D);
    });
  };
  by_dtype(xc, body);
  return out;
}

// CLIP's QuickGELU as transformers computes it: x * sigmoid(1.702 * x), each op rounded.
torch::Tensor quick_gelu(torch::Tensor x) {
  check_cpu(x, "quick_gelu");
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t N = xc.numel();
  auto body = [&](auto tag) {
    using T = decltype(tag);
    const T* xp = ptr<T>(xc);
    T* op = ptr<T>(out);
    at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float v = load(xp + i);
        const float t = round_to<T>(1.702f * v);
        const float e = exp_nonpositive(-std::fabs(t));
        const float sig = round_to<T>(t >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
        store(op + i, v * sig);
      }
    });
  };
  by_dtype(xc, body);
  return out;
}

// linear.cpp
bool has_bf16_linear();
torch::Tensor pack_linear(torch::Tensor weight);
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, std::optional<torch::Tensor> bias, int64_t N);

// Every op releases the GIL while it runs (as PyTorch's own ops do): the server's HTTP side keeps streaming tokens
// on the other core meanwhile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("has_bf16_linear", &has_bf16_linear, "whether linear/pack_linear were built (AVX512-BF16)", nogil());
  m.def("pack_linear", &pack_linear, "a bf16 weight [N, K] packed for linear", nogil());
  m.def("linear", &linear, "x [..., K] @ a packed weight + bias -> [..., N] (bf16)", nogil(), py::arg("x"),
        py::arg("packed"), py::arg("bias") = py::none(), py::arg("n"));
  m.def("rope", &rope, "RoPE on the first heads of a fused q/k/v projection", nogil());
  m.def("quick_gelu", &quick_gelu, "x * sigmoid(1.702 x)", nogil());
  m.def("decode_attention", &decode_attention,
        "attention of one decode step (q [B,H,R,D], k/v [B,H,L,D], valid [B])", nogil());
  m.def("rope_attention", &rope_attention, "RoPE, cache write and attention of one decode step", nogil());
  m.def("add_rms_norm", &add_rms_norm, "residual add and RMSNorm", nogil());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up", nogil());
}
