// w8a8 linear layer for the CPU: int8 weights (N, K) with one fp32 scale per output channel, and
// activations quantized to int8 on the fly, per row in blocks of `block` elements (a multiple of 32)
// with one fp32 scale each (absmax / 127, like llama.cpp's Q8 activations). Products are summed in
// int32, exactly; floats enter only once per block:
//
//     y[m, n] = wscale[n] * sum_b xscale[m, b] * (xq[m, block b] . wq[n, block b])   (+ bias[n])
//
// The order of every float operation is fixed and does not depend on the ISA or on the batch: a block's
// integer dot is kept as 8 int32 lanes (lane l sums the products at offsets 4l..4l+3 of each 32-byte
// chunk of the block), each lane is converted and fused-multiply-added into its fp32 lane with the
// block's scale, and the 8 lanes are reduced as ((l0+l4)+(l2+l6))+((l1+l5)+(l3+l7)). Integer sums are
// exact, so any ISA that forms those lanes computes the same bits: the AVX2 path (vpmaddubsw on |x| and
// sign(w, x), as the instruction is unsigned x signed), the AVX512-VNNI path (vpdpbusd, same trick) and
// the portable loop agree bitwise, and a row's numbers never depend on what shares its batch.
//
// Weights must lie in [-127, 127] (quantize_per_channel's range): sign(-128) would not flip.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LORAPLEX_X86 1
#endif

namespace {

constexpr int64_t kChunk = 32;       // bytes per integer step: 8 int32 lanes of 4 products each
constexpr int kLanes = 8;            // fp32 lanes per output, whatever the ISA
constexpr int64_t kOuts = 4;         // outputs (weight rows) per unit of work
constexpr int64_t kMaxBlock = 1024;  // longest activation block (the tail buffer's size)
// A block whose absmax is below this quantizes to zeros with scale 0: 127 / absmax would overflow.
constexpr float kTinyAbsmax = 0x1p-100f;

enum class Isa { kPortable, kAvx2, kAvx512Vnni };

// One row's activations quantized: int8 values and their magnitudes, zero-padded to whole blocks.
struct QuantizedRows {
  std::vector<int8_t> q;   // (M, Kp)
  std::vector<uint8_t> a;  // (M, Kp) |q|
  std::vector<float> s;    // (M, nb)
};

void quantize_row(const float* x, int64_t K, int64_t block, int64_t nb, int8_t* q, uint8_t* a, float* s) {
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * block, k1 = std::min(K, k0 + block);
    float absmax = 0.0f;
    bool finite = true;
    for (int64_t k = k0; k < k1; ++k) {
      finite = finite && std::isfinite(x[k]);
      absmax = std::max(absmax, std::fabs(x[k]));
    }
    const bool live = finite && absmax >= kTinyAbsmax;
    // a non-finite block poisons the row's outputs (NaN) instead of vanishing
    s[b] = live ? absmax / 127.0f : (finite ? 0.0f : std::nanf(""));
    const float inv = live ? 127.0f / absmax : 0.0f;
    for (int64_t k = k0; k < k0 + block; ++k) {
      float v = 0.0f;
      if (live && k < k1) v = std::min(127.0f, std::max(-127.0f, std::nearbyint(x[k] * inv)));
      q[k] = static_cast<int8_t>(v);
      a[k] = static_cast<uint8_t>(std::abs(static_cast<int>(q[k])));
    }
  }
}

inline float reduce_lanes(const float* l) { return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7])); }

// Pointers to NB weight rows' bytes for block b; a block that runs past K is copied, zero-padded, into
// `tail` (the padded activations are zero there too, but reading past the tensor is not allowed).
template <int NB>
inline void block_rows(const int8_t* w, int64_t K, int64_t block, int64_t b, int8_t* tail, const int8_t** rows) {
  const int64_t k0 = b * block;
  if (k0 + block <= K) {
    for (int j = 0; j < NB; ++j) rows[j] = w + j * K + k0;
    return;
  }
  std::memset(tail, 0, NB * block);
  for (int j = 0; j < NB; ++j) {
    std::memcpy(tail + j * block, w + j * K + k0, K - k0);
    rows[j] = tail + j * block;
  }
}

// Portable: the lanes formed one product at a time.
template <int NB>
void row_portable(const int8_t* q, const uint8_t*, const float* s, const int8_t* w, int64_t K, int64_t block,
                  int64_t nb, int8_t* tail, float* out) {
  float lanes[NB][kLanes] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* rows[NB];
    block_rows<NB>(w, K, block, b, tail, rows);
    const int8_t* qb = q + b * block;
    for (int j = 0; j < NB; ++j) {
      int32_t isum[kLanes] = {};
      for (int64_t k = 0; k < block; ++k) isum[(k % kChunk) / 4] += int32_t(qb[k]) * int32_t(rows[j][k]);
      for (int l = 0; l < kLanes; ++l) lanes[j][l] = std::fma(static_cast<float>(isum[l]), s[b], lanes[j][l]);
    }
  }
  for (int j = 0; j < NB; ++j) out[j] = reduce_lanes(lanes[j]);
}

#if defined(LORAPLEX_X86)
__attribute__((target("avx2,fma"))) inline float reduce_lanes_avx2(__m256 v) {
  alignas(32) float l[kLanes];
  _mm256_store_ps(l, v);
  return reduce_lanes(l);
}

template <int NB>
__attribute__((target("avx2,fma"))) void row_avx2(const int8_t* q, const uint8_t* a, const float* s,
                                                   const int8_t* w, int64_t K, int64_t block, int64_t nb,
                                                   int8_t* tail, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 lanes[NB];
  for (int j = 0; j < NB; ++j) lanes[j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* rows[NB];
    block_rows<NB>(w, K, block, b, tail, rows);
    __m256i isum[NB];
    for (int j = 0; j < NB; ++j) isum[j] = _mm256_setzero_si256();
    for (int64_t c = 0; c < block; c += kChunk) {
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * block + c));
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + b * block + c));
      for (int j = 0; j < NB; ++j) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + c));
        // |x| * (w * sign x) = x * w; pairs stay within int16 as |x|, |w| <= 127
        const __m256i pairs = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv, xq));
        isum[j] = _mm256_add_epi32(isum[j], _mm256_madd_epi16(pairs, ones));
      }
    }
    const __m256 scale = _mm256_set1_ps(s[b]);
    for (int j = 0; j < NB; ++j) lanes[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[j]), scale, lanes[j]);
  }
  for (int j = 0; j < NB; ++j) out[j] = reduce_lanes_avx2(lanes[j]);
}

// AVX512-VNNI: vpdpbusd sums 4 products per int32 lane over 64 bytes (two chunks); folding the upper
// 8 lanes onto the lower 8 gives exactly the AVX2 path's lanes, after which the epilogue is the same.
template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) void row_avx512vnni(
    const int8_t* q, const uint8_t* a, const float* s, const int8_t* w, int64_t K, int64_t block, int64_t nb,
    int8_t* tail, float* out) {
  __m256 lanes[NB];
  for (int j = 0; j < NB; ++j) lanes[j] = _mm256_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* rows[NB];
    block_rows<NB>(w, K, block, b, tail, rows);
    __m512i isum[NB];
    for (int j = 0; j < NB; ++j) isum[j] = _mm512_setzero_si512();
    int64_t c = 0;
    for (; c + 2 * kChunk <= block; c += 2 * kChunk) {
      const __m512i xq = _mm512_loadu_si512(q + b * block + c);
      const __m512i xa = _mm512_loadu_si512(a + b * block + c);
      const __mmask64 negative = _mm512_movepi8_mask(xq);
      for (int j = 0; j < NB; ++j) {
        const __m512i wv = _mm512_loadu_si512(rows[j] + c);
        isum[j] = _mm512_dpbusd_epi32(isum[j], xa, _mm512_mask_sub_epi8(wv, negative, zero, wv));
      }
    }
    __m256i folded[NB];
    for (int j = 0; j < NB; ++j)
      folded[j] = _mm256_add_epi32(_mm512_castsi512_si256(isum[j]), _mm512_extracti64x4_epi64(isum[j], 1));
    if (c < block) {  // an odd chunk: 256-bit VNNI
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * block + c));
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + b * block + c));
      const __mmask32 negative = _mm256_movepi8_mask(xq);
      for (int j = 0; j < NB; ++j) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + c));
        folded[j] = _mm256_dpbusd_epi32(folded[j], xa, _mm256_mask_sub_epi8(wv, negative, _mm256_setzero_si256(), wv));
      }
    }
    const __m256 scale = _mm256_set1_ps(s[b]);
    for (int j = 0; j < NB; ++j) lanes[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(folded[j]), scale, lanes[j]);
  }
  for (int j = 0; j < NB; ++j) out[j] = reduce_lanes_avx2(lanes[j]);
}
#endif

Isa best_isa() {
#if defined(LORAPLEX_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

Isa parse_isa(const std::string& name) {
  static const Isa best = best_isa();
  if (name.empty()) return best;
  const Isa wanted = name == "avx512vnni" ? Isa::kAvx512Vnni : name == "avx2" ? Isa::kAvx2 : Isa::kPortable;
  TORCH_CHECK(name == "portable" || name == "avx2" || name == "avx512vnni", "int8_linear_a8: unknown isa ", name);
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(best), "int8_linear_a8: this CPU lacks ", name);
  return wanted;
}

template <int NB>
void row(Isa isa, const int8_t* q, const uint8_t* a, const float* s, const int8_t* w, int64_t K, int64_t block,
         int64_t nb, int8_t* tail, float* out) {
#if defined(LORAPLEX_X86)
  if (isa == Isa::kAvx512Vnni) return row_avx512vnni<NB>(q, a, s, w, K, block, nb, tail, out);
  if (isa == Isa::kAvx2) return row_avx2<NB>(q, a, s, w, K, block, nb, tail, out);
#endif
  row_portable<NB>(q, a, s, w, K, block, nb, tail, out);
}

}  // namespace

// The ISA the kernel uses on this CPU: "avx512vnni", "avx2" or "portable".
std::string int8_linear_a8_isa() {
  switch (parse_isa("")) {
    case Isa::kAvx512Vnni: return "avx512vnni";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

// x (M, K) fp32 contiguous, weight (N, K) int8 contiguous in [-127, 127], scale (N,) fp32, bias (N,) fp32
// or empty; block: the activations' quantization block (a multiple of 32); isa: "" for the best here.
torch::Tensor int8_linear_a8(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias,
                             int64_t block, const std::string& isa_name) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && scale.dim() == 1, "int8_linear_a8: bad ranks of tensors");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kChar &&
                  scale.scalar_type() == torch::kFloat,
              "int8_linear_a8: x fp32, weight int8, scale fp32");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && scale.is_contiguous(), "int8_linear_a8: contiguous");
  TORCH_CHECK(block > 0 && block % kChunk == 0 && block <= kMaxBlock, "int8_linear_a8: block must be a multiple of ",
              kChunk, " up to ", kMaxBlock, ", not ", block);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && scale.size(0) == N, "int8_linear_a8: shapes differ");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == torch::kFloat && bias.is_contiguous() && bias.numel() == N),
              "int8_linear_a8: bias fp32 (N,)");
  const Isa isa = parse_isa(isa_name);
  const int64_t nb = (K + block - 1) / block, Kp = nb * block;
  QuantizedRows xq{std::vector<int8_t>(M * Kp), std::vector<uint8_t>(M * Kp), std::vector<float>(M * nb)};
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      quantize_row(xp + m * K, K, block, nb, &xq.q[m * Kp], &xq.a[m * Kp], &xq.s[m * nb]);
  });
  auto y = torch::empty({M, N}, x.options());
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t units = (N + kOuts - 1) / kOuts;
  // Threads split the outputs, never the reduction over K: a row's numbers are the same for any split.
  at::parallel_for(0, units, 8, [&](int64_t begin, int64_t end) {
    alignas(64) int8_t tail[kOuts * kMaxBlock];
    float sums[kOuts];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n0 = u * kOuts, outs = std::min<int64_t>(kOuts, N - n0);
      const int8_t* wu = wp + n0 * K;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* qm = &xq.q[m * Kp];
        const uint8_t* am = &xq.a[m * Kp];
        const float* sm = &xq.s[m * nb];
        switch (outs) {
          case 4: row<4>(isa, qm, am, sm, wu, K, block, nb, tail, sums); break;
          case 3: row<3>(isa, qm, am, sm, wu, K, block, nb, tail, sums); break;
          case 2: row<2>(isa, qm, am, sm, wu, K, block, nb, tail, sums); break;
          default: row<1>(isa, qm, am, sm, wu, K, block, nb, tail, sums); break;
        }
        float* yr = yp + m * N + n0;
        for (int64_t j = 0; j < outs; ++j) {
          const float v = sums[j] * sp[n0 + j];
          yr[j] = bp ? v + bp[n0 + j] : v;
        }
      }
    }
  });
  return y;
}
