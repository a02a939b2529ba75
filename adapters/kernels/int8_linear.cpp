// Weight-only int8 linear layer for the CPU: y = (x W_q^T) * scale (+ bias), W_q int8 (N, K) with one
// fp32 scale per output channel, x and y fp32.
//
// Every output y[m, n] is computed by the same sequence of operations whatever the number of rows M
// and wherever row m sits in the batch: 16-lane fp32 partial sums over k in order, one fixed
// horizontal reduction, then the scale. So a row's numbers never depend on what shares its batch
// (greedy outputs of a batched request equal the same request alone), unlike BLAS GEMMs, which pick
// different blockings for different M. Rows are processed in tiles of up to 4, against 4 weight rows
// at a time: each int8 weight vector is widened once per tile and used by every row of it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kOutsPerBlock = 4;  // weight rows (outputs) per block
constexpr int64_t kRowsPerTile = 6;   // activation rows per tile: 6 x 4 accumulators stay in registers

#if defined(__AVX512F__)
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

// One row (M = 1): each int8 weight vector is widened in registers and used once.
template <int NB>
void row_direct(const float* x, const int8_t* w, float* sums, int64_t K) {
  __m512 acc[NB];
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = tail_mask(K - k);
    const __m512 xv = _mm512_maskz_loadu_ps(mask, x + k);
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + j * K + k)));
      acc[j] = _mm512_fmadd_ps(xv, wv, acc[j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) sums[j] = _mm512_reduce_add_ps(acc[j]);
}

// Several rows: the block's weights were widened once into ``wf`` (NB rows of Kp floats, zero-padded
// to a multiple of 16), and each tile of MT rows reads them from L1 with no conversion.
template <int MT, int NB>
void rows_widened(const float* x, const float* wf, float* sums, int64_t K, int64_t Kp) {
  __m512 acc[MT][NB];
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = tail_mask(K - k);
    __m512 wv[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_load_ps(wf + j * Kp + k);
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * K + k);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) sums[i * NB + j] = _mm512_reduce_add_ps(acc[i][j]);
}

inline void widen_rows(const int8_t* w, float* wf, int64_t rows, int64_t K, int64_t Kp) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t k = 0; k < Kp; k += 16) {
      const __mmask16 mask = tail_mask(K - k);
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + j * K + k)));
      _mm512_store_ps(wf + j * Kp + k, v);
    }
  }
}
#else
// Portable path with the same per-output order: 16 lane sums over k, then a fixed reduction.
inline float dot_lanes(const float* x, const int8_t* w, int64_t K) {
  float lanes[16] = {0};
  for (int64_t k = 0; k < K; ++k) lanes[k % 16] += x[k] * static_cast<float>(w[k]);
  float sum = 0;
  for (int l = 0; l < 16; ++l) sum += lanes[l];
  return sum;
}
#endif

template <int NB>
void block(const float* x, const int8_t* w, float* wf, float* sums, const float* scale, const float* bias,
           float* y, int64_t M, int64_t K, int64_t Kp, int64_t N, int64_t n0) {
  const int8_t* wb = w + n0 * K;
  auto emit = [&](int64_t m0, int64_t mt) {
    for (int64_t i = 0; i < mt; ++i) {
      float* yr = y + (m0 + i) * N + n0;
      for (int64_t j = 0; j < NB; ++j) {
        const float v = sums[i * NB + j] * scale[n0 + j];
        yr[j] = bias ? v + bias[n0 + j] : v;
      }
    }
  };
#if defined(__AVX512F__)
  if (M == 1) {
    row_direct<NB>(x, wb, sums, K);
    emit(0, 1);
    return;
  }
  widen_rows(wb, wf, NB, K, Kp);
  for (int64_t m0 = 0; m0 < M; m0 += kRowsPerTile) {
    const int64_t mt = std::min<int64_t>(kRowsPerTile, M - m0);
    const float* xt = x + m0 * K;
    switch (mt) {
      case 6: rows_widened<6, NB>(xt, wf, sums, K, Kp); break;
      case 5: rows_widened<5, NB>(xt, wf, sums, K, Kp); break;
      case 4: rows_widened<4, NB>(xt, wf, sums, K, Kp); break;
      case 3: rows_widened<3, NB>(xt, wf, sums, K, Kp); break;
      case 2: rows_widened<2, NB>(xt, wf, sums, K, Kp); break;
      default: rows_widened<1, NB>(xt, wf, sums, K, Kp); break;
    }
    emit(m0, mt);
  }
#else
  (void)wf;
  (void)Kp;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < NB; ++j) sums[j] = dot_lanes(x + m * K, wb + j * K, K);
    emit(m, 1);
  }
#endif
}

}  // namespace

// x (M, K) fp32 contiguous, weight (N, K) int8 contiguous, scale (N,) fp32, bias (N,) fp32 or empty.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && scale.dim() == 1, "int8_linear: bad ranks of tensors");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kChar &&
                  scale.scalar_type() == torch::kFloat,
              "int8_linear: x fp32, weight int8, scale fp32");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && scale.is_contiguous(), "int8_linear: contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && scale.size(0) == N, "int8_linear: shapes differ");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == torch::kFloat && bias.is_contiguous() && bias.numel() == N),
              "int8_linear: bias fp32 (N,)");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t Kp = (K + 15) / 16 * 16;
  const int64_t blocks = (N + kOutsPerBlock - 1) / kOutsPerBlock;
  // Threads split the outputs, never the reduction over K: a row's numbers are the same for any split.
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    alignas(64) float sums[kRowsPerTile * kOutsPerBlock];
    std::vector<float> scratch(kOutsPerBlock * Kp + 16);  // the block's widened weights, 64-byte aligned
    float* wf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kOutsPerBlock;
      switch (std::min<int64_t>(kOutsPerBlock, N - n0)) {
        case 4: block<4>(xp, wp, wf, sums, sp, bp, yp, M, K, Kp, N, n0); break;
        case 3: block<3>(xp, wp, wf, sums, sp, bp, yp, M, K, Kp, N, n0); break;
        case 2: block<2>(xp, wp, wf, sums, sp, bp, yp, M, K, Kp, N, n0); break;
        default: block<1>(xp, wp, wf, sums, sp, bp, yp, M, K, Kp, N, n0); break;
      }
    }
  });
  return y;
}
