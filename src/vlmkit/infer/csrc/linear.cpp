// A bf16 linear (x @ W^T + b) for CPUs with AVX512-BF16, built with decode.cpp by vlmkit/infer/kernels.py. Why:
// at decode batch sizes (a few rows) a linear is a stream over its weight, and oneDNN's packed linear reads it at
// ~28 GB/s on the 2-core machine of docs/serving.md where this reaches ~45 (bench/serve_profile.py measures it);
// at prompt sizes both run at ~1 TFLOP/s.
//
// The weight is packed once (`pack_linear`) as [N/16 blocks][K/2 pairs][16 columns][2]: the 64 bytes of a pair of
// inputs for 16 output columns, which is one VDPBF16PS operand, and each block is one contiguous stream. A tile of
// up to 16 rows x 1 block (few rows: one stream per thread, prefetched far ahead) or 8 rows x 3 blocks (more rows:
// each weight load feeds more products) keeps its sums in fp32 registers; the bias is added in fp32 and the sum
// rounded once to bf16 (round to nearest even), as oneDNN does. Sums run in another order than oneDNN's, so the
// result is not bit-identical to it (tests/test_kernels.py bounds it against an fp64 reference).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kCols = 16;  // output columns per block: one 512-bit register of fp32 sums

#if defined(__AVX512BF16__)
// Rows m < MT of C [.., ldc] at columns of blocks nb0 .. nb0 + NB - 1 (N: valid columns) from A [MT, 2*K2] (lda)
// and the packed weight P; `ahead`: prefetch distance in pairs.
template <int MT, int NB>
void tile(const uint16_t* A, int64_t lda, const uint16_t* P, int64_t K2, int64_t nb0, int64_t N, const float* bias,
          uint16_t* C, int64_t ldc, int64_t ahead) {
  __m512 acc[MT][NB];
  for (int m = 0; m < MT; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_ps();
  const uint16_t* w[NB];
  for (int b = 0; b < NB; ++b) w[b] = P + (nb0 + b) * K2 * 2 * kCols;
  for (int64_t p = 0; p < K2; ++p) {
    __m512bh wv[NB];
    for (int b = 0; b < NB; ++b) {
      wv[b] = (__m512bh)_mm512_loadu_si512(w[b] + p * 2 * kCols);
      _mm_prefetch(reinterpret_cast<const char*>(w[b] + (p + ahead) * 2 * kCols), _MM_HINT_T0);
    }
    for (int m = 0; m < MT; ++m) {
      int32_t pair;
      std::memcpy(&pair, A + m * lda + 2 * p, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], a, wv[b]);
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int64_t n0 = (nb0 + b) * kCols, left = N - n0;
    const __mmask16 mask = left >= kCols ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    const __m512 add = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
    for (int m = 0; m < MT; ++m) {
      const __m256bh r = _mm512_cvtneps_pbh(_mm512_add_ps(acc[m][b], add));
      _mm256_mask_storeu_epi16(C + m * ldc + n0, mask, (__m256i)r);
    }
  }
}

template <int NB, int MAX_ROWS>
void rows(int64_t mt, const uint16_t* A, int64_t lda, const uint16_t* P, int64_t K2, int64_t nb0, int64_t N,
          const float* bias, uint16_t* C, int64_t ldc, int64_t ahead) {
  if constexpr (MAX_ROWS > 1) {
    if (mt < MAX_ROWS) return rows<NB, MAX_ROWS - 1>(mt, A, lda, P, K2, nb0, N, bias, C, ldc, ahead);
  }
  tile<MAX_ROWS, NB>(A, lda, P, K2, nb0, N, bias, C, ldc, ahead);
}
#endif

}  // namespace

bool has_bf16_linear() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// weight [N, K] bf16 (K even) -> the packed layout [ceil(N/16), K/2, 16, 2] (columns past N zero).
torch::Tensor pack_linear(torch::Tensor weight) {
  TORCH_CHECK(has_bf16_linear(), "pack_linear: built without AVX512-BF16");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16 && !weight.is_cuda(),
              "pack_linear: a CPU bf16 weight [N, K]");
  const int64_t N = weight.size(0), K = weight.size(1), blocks = (N + kCols - 1) / kCols;
  TORCH_CHECK(K % 2 == 0 && K > 0, "pack_linear: K must be even");
  auto padded = torch::zeros({blocks * kCols, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({blocks, kCols, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

// x [..., K] bf16 @ the packed weight (`pack_linear` of [N, K]) + bias [N] (optional) -> [..., N] bf16.
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, std::optional<torch::Tensor> bias, int64_t N) {
  TORCH_CHECK(has_bf16_linear(), "linear: built without AVX512-BF16");
  TORCH_CHECK(!x.is_cuda() && x.scalar_type() == torch::kBFloat16, "linear: a CPU bf16 input");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kCols && packed.size(3) == 2 && packed.is_contiguous(),
              "linear: a weight packed by pack_linear");
  const int64_t K = x.size(-1), K2 = packed.size(1), blocks = packed.size(0);
  TORCH_CHECK(K == 2 * K2 && N > blocks * kCols - kCols && N <= blocks * kCols, "linear: shapes do not match");
  auto a = x.reshape({-1, K}).contiguous();
  const int64_t M = a.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto out = torch::empty({M, N}, x.options());
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "linear: bias must have N values");
    b = bias->to(torch::kFloat).contiguous();
  }
#if defined(__AVX512BF16__)
  if (M == 0) return out.view(sizes);
  const uint16_t* A = reinterpret_cast<const uint16_t*>(a.data_ptr());
  const uint16_t* P = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  uint16_t* C = reinterpret_cast<uint16_t*>(out.data_ptr());
  // few rows: 16-row x 1-block tiles, far prefetch (a stream); more: 8 x 3 (each weight load feeds 24 products)
  const bool few = M <= 16;
  const int64_t group = few ? 1 : 3, tile_rows = few ? 16 : 8, ahead = few ? 128 : 64;
  const int64_t groups = (blocks + group - 1) / group;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t nb0 = g * group, nb = std::min(group, blocks - nb0);
      for (int64_t m0 = 0; m0 < M; m0 += tile_rows) {
        const int64_t mt = std::min(tile_rows, M - m0);
        const uint16_t* am = A + m0 * K;
        uint16_t* cm = C + m0 * N;
        if (few) rows<1, 16>(mt, am, K, P, K2, nb0, N, bp, cm, N, ahead);
        else if (nb == 3) rows<3, 8>(mt, am, K, P, K2, nb0, N, bp, cm, N, ahead);
        else if (nb == 2) rows<2, 8>(mt, am, K, P, K2, nb0, N, bp, cm, N, ahead);
        else rows<1, 8>(mt, am, K, P, K2, nb0, N, bp, cm, N, ahead);
      }
    }
  });
#endif
  return out.view(sizes);
}
