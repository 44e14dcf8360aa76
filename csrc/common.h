// Helpers shared by the CPU kernels: ISA multiversioning, vectorisable float math, argument
// checks, row-major GEMM on raw buffers, deterministic reductions over fixed row blocks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

// GPT1_SIMD marks a hot loop nest to be compiled three times (AVX-512, AVX2+FMA, baseline
// x86-64) and picked when the library loads (GCC function multiversioning). The build has no
// -march=native, so without it every loop would be SSE2. A GPT1_SIMD function must hold its
// loops itself: lambdas inside it (e.g. the body of at::parallel_for) are not cloned, so a
// parallel region calls a GPT1_SIMD function per range, never the other way round.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define GPT1_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GPT1_SIMD
#endif

#if defined(__GNUC__)
#define GPT1_INLINE inline __attribute__((always_inline))
#else
#define GPT1_INLINE inline
#endif

namespace gpt1 {

// Accumulation type: double for double, float for everything else.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- vectorisable math --------------------------------------------------------------------

// e^x in float, written so that GCC vectorises loops calling it (no libm call, no branch):
// n = round(x·log₂e), r = x − n·ln2 (Cody–Waite split), e^r by Cephes' degree-5 minimax
// polynomial, then 2ⁿ through the exponent bits. Max relative error 8e-8 (measured) on [-87, 88];
// inputs are clamped to that range (e^x underflows to ≈1e-38 rather than 0, which callers that
// need an exact 0 — masked scores — write themselves).
GPT1_INLINE float exp_fast(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}
GPT1_INLINE double exp_fast(double x) { return std::exp(x); }

// ---- argument checks ----------------------------------------------------------------------

// float16, bfloat16, float32 or float64.
inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  const auto d = t.scalar_type();
  TORCH_CHECK_VALUE(d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf, op, ": ", name,
              " must be float32, float64, bfloat16 or float16, got ", d);
}

// A CPU tensor of exactly `dtype` and `sizes`; returned contiguous.
inline at::Tensor checked(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                          at::IntArrayRef sizes) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  return t.contiguous();
}

// The dropout seed: checks p ∈ [0, 1) and, when p > 0, that seed is an int64 CPU tensor of
// one element; returns its value (0 when p == 0, where no random number is drawn).
inline uint64_t read_seed(const char* op, double dropout_p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p == 0.0) return 0;
  TORCH_CHECK_VALUE(seed.has_value(), op, ": dropout_p = ", dropout_p, " > 0 needs a seed tensor, got None");
  const at::Tensor& s = *seed;
  TORCH_CHECK_VALUE(s.device().is_cpu() && s.scalar_type() == at::kLong && s.numel() == 1, op,
              ": seed must be an int64 CPU tensor of one element, got ", s.scalar_type(), " of shape ",
              s.sizes(), " on ", s.device());
  return static_cast<uint64_t>(s.item<int64_t>());
}

// Kernels compute in float32 or float64; float16/bfloat16 inputs run through the float32
// kernel (upcast on entry, results cast back on exit).
inline at::ScalarType compute_dtype(at::ScalarType d) { return d == at::kDouble ? at::kDouble : at::kFloat; }

// Kernels compute in the dtypes they choose. Under torch.autocast the caller's thread still has
// autocast on, which would recast the ATen ops a kernel calls (at::addmm → bfloat16): every op
// entry point that calls ATen math holds this guard.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// ---- GEMM -------------------------------------------------------------------------------

// C = alpha · op(A) · op(B) + beta · C on row-major buffers with leading dimensions lda/ldb/ldc
// (elements), op(X) = Xᵀ when trans_X; A is m×k and B k×n after op. Runs ATen's mm (MKL or
// OpenBLAS) on views of the buffers, so tiles are read in place (e.g. Q straight out of the
// packed QKV rows, ld = 3C) with no copy; inside at::parallel_for the BLAS runs on the calling
// thread only. beta = 0 ignores C's previous contents (NaNs included).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    auto t = at::from_blob(const_cast<T*>(p), trans ? at::IntArrayRef{cols, rows} : at::IntArrayRef{rows, cols},
                           {ld, 1}, opts);
    return trans ? t.t() : t;
  };
  auto A = view(a, m, k, lda, trans_a), B = view(b, k, n, ldb, trans_b);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == T(0) && alpha == T(1)) {
    at::mm_out(C, A, B);
  } else {
    at::addmm_out(C, C, A, B, beta, alpha);
  }
}

// ---- parallelism ---------------------------------------------------------------------

// Grain (items per chunk) for at::parallel_for such that a chunk holds at least ~2¹⁶ units of
// work (elements or multiply-adds): small calls run inline on the calling thread, where waking
// the thread pool would cost more than the work (and much more on a busy machine).
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, work_per_item));
}

// ---- deterministic column sums ----------------------------------------------------------

// Rows are reduced in fixed blocks of kRowsPerBlock: each block's partial column sums are
// written to its own slot, then the slots are added in block order. Same bits for any thread
// count, no atomics.
constexpr int64_t kRowsPerBlock = 32;

inline int64_t n_row_blocks(int64_t rows) { return (rows + kRowsPerBlock - 1) / kRowsPerBlock; }

// out[c] = Σ_b partials[b·stride + c] for b = 0..n_blocks−1 in order; parallel over columns.
template <typename acc>
void sum_blocks_in_order(const acc* partials, int64_t n_blocks, int64_t stride, int64_t width, acc* out) {
  at::parallel_for(0, width, grain_for(n_blocks), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) out[c] = 0;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const acc* p = partials + b * stride;
      for (int64_t c = begin; c < end; ++c) out[c] += p[c];
    }
  });
}

}  // namespace gpt1
