// The attention of one decode step on CPU: every row has one new query per head and attends to the first valid[b]
// keys of its own cache slot. Built by vlmkit/infer/attention_kernel.py (torch.utils.cpp_extension, -O3
// -march=native); see that module for why and how it is checked.
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
  TORCH_CHECK(!q.is_cuda(), "CPU only");
  auto qc = q.contiguous();
  auto vl = valid.to(torch::kLong).contiguous();
  auto out = torch::empty_like(qc);
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), D = q.size(3), L = k.size(2);
  const int64_t kst[3] = {k.stride(0), k.stride(1), k.stride(2)}, vst[3] = {v.stride(0), v.stride(1), v.stride(2)};
  if (q.scalar_type() == torch::kBFloat16) {
    dispatch<uint16_t>(reinterpret_cast<const uint16_t*>(qc.data_ptr()), reinterpret_cast<const uint16_t*>(k.data_ptr()),
                       reinterpret_cast<const uint16_t*>(v.data_ptr()), vl.data_ptr<int64_t>(),
                       reinterpret_cast<uint16_t*>(out.data_ptr()), B, H, R, D, L, kst, vst, float(scale));
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat, "bf16 or fp32");
    dispatch<float>(qc.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), vl.data_ptr<int64_t>(),
                    out.data_ptr<float>(), B, H, R, D, L, kst, vst, float(scale));
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "attention of one decode step (q [B,H,R,D], k/v [B,H,L,D], valid [B])");
}
