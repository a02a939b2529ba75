// Batched gather matrix-vector LoRA (Punica's BGMV) for the CPU: every row adds its own adapter's
// delta, y[n] += B[s_n] (A[s_n] x[n]), reading each row's adapter weights in place from the banks.
// One call per linear layer replaces the gathers, masks and batched matmuls of the plain-torch modes;
// each row's result depends on that row alone, so a batch never changes a row's numbers.
#include <torch/extension.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
void bgmv_rows(const T* x, T* y, const T* A, const T* Bt, const int64_t* slots, const int32_t* ranks,
               int64_t rows, int64_t in, int64_t out, int64_t r_cap) {
  using F = acc_t<T>;
  std::vector<F> xf(in), h(r_cap), acc(out);
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t s = slots[n];
    if (s <= 0) continue;
    const int64_t r = ranks[s];
    if (r <= 0) continue;
    const T* xr = x + n * in;
    for (int64_t k = 0; k < in; ++k) xf[k] = static_cast<F>(xr[k]);
    const T* As = A + s * r_cap * in;
    for (int64_t j = 0; j < r; ++j) {
      const T* a = As + j * in;
      F sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < in; ++k) sum += static_cast<F>(a[k]) * xf[k];
      h[j] = sum;
    }
    std::fill(acc.begin(), acc.end(), F(0));
    const T* Bs = Bt + s * r_cap * out;
    for (int64_t j = 0; j < r; ++j) {
      const F hj = h[j];
      const T* b = Bs + j * out;
#pragma omp simd
      for (int64_t o = 0; o < out; ++o) acc[o] += static_cast<F>(b[o]) * hj;
    }
    T* yr = y + n * out;
    for (int64_t o = 0; o < out; ++o) yr[o] = static_cast<T>(static_cast<F>(yr[o]) + acc[o]);
  }
}

}  // namespace

// y (N, out) += per row n: Bt[s_n, :r]^T (A[s_n, :r] x[n]); slot 0 (or rank 0) adds nothing.
// x (N, in), A (S, r_cap, in), Bt (S, r_cap, out): same dtype, contiguous; slots (N,) int64; ranks (S,) int32.
void bgmv_(torch::Tensor y, torch::Tensor x, torch::Tensor A, torch::Tensor Bt, torch::Tensor slots,
           torch::Tensor ranks) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && A.dim() == 3 && Bt.dim() == 3, "bgmv_: bad ranks of tensors");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && A.is_contiguous() && Bt.is_contiguous(),
              "bgmv_: tensors must be contiguous");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && A.scalar_type() == y.scalar_type() &&
                  Bt.scalar_type() == y.scalar_type(),
              "bgmv_: x, y, A and Bt must share a dtype");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && ranks.scalar_type() == torch::kInt, "bgmv_: index dtypes");
  TORCH_CHECK(x.size(0) == y.size(0) && slots.size(0) == x.size(0), "bgmv_: row counts differ");
  TORCH_CHECK(A.size(2) == x.size(1) && Bt.size(2) == y.size(1) && A.size(1) == Bt.size(1), "bgmv_: shapes");
  TORCH_CHECK(ranks.size(0) == A.size(0), "bgmv_: one rank per slot");
  const int64_t slots_n = A.size(0);
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < slots.size(0); ++n) TORCH_CHECK(s[n] >= 0 && s[n] < slots_n, "bgmv_: slot out of range");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "bgmv_", [&] {
    bgmv_rows<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                        Bt.data_ptr<scalar_t>(), s, ranks.data_ptr<int32_t>(), x.size(0), x.size(1), y.size(1),
                        A.size(1));
  });
}
