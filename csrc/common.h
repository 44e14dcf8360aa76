// Helpers shared by the CPU kernels: ISA multiversioning, vectorisable float math, argument
// checks, row-major GEMM on raw buffers, deterministic reductions over fixed row blocks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
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

// The dtype of acc_t<T>, for allocating accumulators beside a tensor of dtype d.
inline at::ScalarType acc_dtype(at::ScalarType d) { return d == at::kDouble ? at::kDouble : at::kFloat; }

// ---- element access in acc_t<T>: load(p, i) widens p[i], store(p, i, v) rounds v into p[i] ------
// bfloat16 goes through its uint16 bits, branch-free: GCC does not vectorise loads and stores of
// the c10::BFloat16 struct itself, nor its constructor's NaN branch.

template <typename T>
GPT1_INLINE acc_t<T> load(const T* p, int64_t i) {
  return p[i];
}
GPT1_INLINE float load(const at::BFloat16* p, int64_t i) {
  const uint32_t bits = uint32_t(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
GPT1_INLINE void store(T* p, int64_t i, acc_t<T> v) {
  p[i] = v;
}
// Round to nearest even, NaN kept NaN (as c10::BFloat16's constructor).
GPT1_INLINE void store(at::BFloat16* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  reinterpret_cast<uint16_t*>(p)[i] = uint16_t(nan ? 0x7FC0u : rounded);
}

// dst[i] = T(src[i]) for i < n: a float tile rounded to bf16 for the next GEMM.
template <typename T>
GPT1_INLINE void store_tile(const acc_t<T>* __restrict src, T* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store(dst, i, src[i]);
}

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

// The dtype a kernel computes in. bfloat16 stays bfloat16: its GEMMs run on bf16 operands
// (ATen → oneDNN, AMX where the CPU has it; fp32 accumulation), while every elementwise sweep,
// softmax, statistic and reduction runs in float32 (acc_t). float16 runs through the float32
// kernel (upcast on entry, results cast back on exit): few CPUs have fast fp16 GEMMs.
inline at::ScalarType compute_dtype(at::ScalarType d) {
  return d == at::kDouble ? at::kDouble : d == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

// Kernels compute in the dtypes they choose. Under torch.autocast the caller's thread still has
// autocast on, which would recast the ATen ops a kernel calls (at::addmm → bfloat16): every op
// entry point that calls ATen math holds this guard.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// ---- tile GEMM --------------------------------------------------------------------------

// A GEMM operand: a row-major tile at p with leading dimension ld, used transposed when `trans`.
template <typename T>
struct Tile {
  const T* p;
  int64_t ld;
  bool trans = false;
};

// dst (cols × rows, ld rows) = srcᵀ rounded to T, for a rows × cols tile src (ld ld_src): the
// transposed operand a row-major GEMM needs (brgemm has no transposes).
template <typename S, typename T>
GPT1_SIMD void transpose_tile(const S* __restrict src, int64_t ld_src, int64_t rows, int64_t cols, T* __restrict dst) {
  for (int64_t c = 0; c < cols; ++c) {
    T* __restrict out = dst + c * rows;
#pragma omp simd
    for (int64_t r = 0; r < rows; ++r) store(out, r, load(src, r * ld_src + c));
  }
}

// C = op(A)·op(B), or C += when accumulate: op(A) m×k, op(B) k×n in T; C m×n (ld ldc) in acc_t<T>.
// float, double: ATen's mm on views of the tiles (MKL; transposes free, fp32 rounding as before).
// bfloat16: ATen's batch-reduce GEMM (cpublas::brgemm), bf16 operands accumulated into the float C
// in place (never rounded in between), no dispatcher per tile; it has no transposes, so a
// transposed operand is first copied out into `buf` (room for m·k or k·n elements).
// Callable inside at::parallel_for: each call runs on the calling thread.
template <typename T>
void tile_gemm(int64_t m, int64_t n, int64_t k, Tile<T> a, Tile<T> b, bool accumulate, acc_t<T>* c, int64_t ldc,
               T* buf) {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    TORCH_INTERNAL_ASSERT(!(a.trans && b.trans), "tile_gemm: at most one transposed operand");
    if (a.trans) {
      transpose_tile<T, T>(a.p, a.ld, k, m, buf);
      a = {buf, k};
    }
    if (b.trans) {
      transpose_tile<T, T>(b.p, b.ld, n, k, buf);
      b = {buf, n};
    }
    at::native::cpublas::brgemm(m, n, k, a.ld, b.ld, ldc, accumulate, a.p, b.p, c, /*is_vnni=*/false);
    return;
  }
#endif
  using acc = acc_t<T>;
  auto view = [](Tile<T> t, int64_t rows, int64_t cols) {  // op(t) as a rows × cols tensor in acc
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    auto v = t.trans ? at::from_blob(const_cast<T*>(t.p), {cols, rows}, {t.ld, 1}, opts).t()
                     : at::from_blob(const_cast<T*>(t.p), {rows, cols}, {t.ld, 1}, opts);
    if constexpr (std::is_same_v<T, acc>) {
      return v;
    } else {
      return v.to(c10::CppTypeToScalarType<acc>::value);  // bf16 on a torch without brgemm
    }
  };
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value));
  if (accumulate) {
    C.addmm_(view(a, m, k), view(b, k, n));
  } else {
    at::mm_out(C, view(a, m, k), view(b, k, n));
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
