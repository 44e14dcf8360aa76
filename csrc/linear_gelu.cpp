// Linear + GELU on CPU: y = GELU(pre), pre = x Wᵀ + b — the FFN's first projection.
// Spec: engine/reference.py::linear_gelu.
//
// Forward: pre = addmm(b, x, Wᵀ) (ATen → MKL), then one parallel vectorised pass y = GELU(pre).
// pre is returned for backward (the schema's second output), so backward never redoes the GEMM.
// Backward: one parallel vectorised pass dpre = dy · GELU'(pre) that also sums grad_bias = Σ_rows
// dpre over fixed blocks of rows (added in block order: deterministic), then two GEMMs:
// grad_x = dpre W, grad_W = dpreᵀ x.
//
// GELU forms (z = pre), with σ(t) = 1/(1 + e^−t):
//   "tanh": GELU(z) = ½z(1 + tanh u) = z·σ(2u),  u = √(2/π)(z + 0.044715 z³)
//           GELU'(z) = σ(2u) + z·σ(2u)(1 − σ(2u))·2u',  u' = √(2/π)(1 + 3·0.044715 z²)
//   "none": GELU(z) = z·Φ(z),  Φ(z) = ½(1 + erf(z/√2))
//           GELU'(z) = Φ(z) + z·φ(z),  φ(z) = e^(−z²/2)/√(2π)
// float32 evaluates e^t with exp_fast and erf with Abramowitz–Stegun 7.1.26 (|error| ≤ 1.5e-7),
// both branch-free so the passes vectorise (GPT1_SIMD); float64 uses libm. float16/bfloat16 run
// through the float32 kernel.
#include <string_view>
#include <vector>

#include "common.h"
#include "ops.h"

namespace gpt1 {
namespace {

constexpr const char* kOp = "linear_gelu";
constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kCubic = 0.044715;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

// erf(x) (A&S 7.1.26), odd: 1 − (a₁t + a₂t² + a₃t³ + a₄t⁴ + a₅t⁵)·e^(−x²), t = 1/(1 + 0.3275911|x|).
GPT1_INLINE float erf_fast(float x) {
  const float ax = std::abs(x);
  const float t = 1.f / (1.f + 0.3275911f * ax);
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float e = 1.f - poly * exp_fast(-ax * ax);
  return std::copysign(e, x);
}
GPT1_INLINE double erf_fast(double x) { return std::erf(x); }

template <typename T>
GPT1_INLINE T sigmoid(T t) {
  return T(1) / (T(1) + exp_fast(-t));
}

template <typename T>
GPT1_INLINE T gelu_tanh(T z) {
  const T u = T(kSqrt2OverPi) * (z + T(kCubic) * z * z * z);
  if constexpr (std::is_same_v<T, double>) return T(0.5) * z * (T(1) + std::tanh(u));
  return z * sigmoid(T(2) * u);
}

template <typename T>
GPT1_INLINE T gelu_tanh_grad(T z) {
  const T u = T(kSqrt2OverPi) * (z + T(kCubic) * z * z * z);
  const T du = T(kSqrt2OverPi) * (T(1) + T(3 * kCubic) * z * z);
  if constexpr (std::is_same_v<T, double>) {
    const T th = std::tanh(u);  // d/dz ½z(1 + tanh u) = ½(1 + tanh u) + ½z(1 − tanh²u)u'
    return T(0.5) * (T(1) + th) + T(0.5) * z * (T(1) - th * th) * du;
  }
  const T s = sigmoid(T(2) * u);
  return s + z * s * (T(1) - s) * T(2) * du;
}

template <typename T>
GPT1_INLINE T gelu_erf(T z) {
  return z * T(0.5) * (T(1) + erf_fast(z * T(kInvSqrt2)));
}

template <typename T>
GPT1_INLINE T gelu_erf_grad(T z) {
  const T cdf = T(0.5) * (T(1) + erf_fast(z * T(kInvSqrt2)));
  return cdf + z * T(kInvSqrt2Pi) * exp_fast(T(-0.5) * z * z);
}

// y = GELU(pre) over elements [begin, end).
template <typename T>
GPT1_SIMD void gelu_fwd_span(const T* __restrict pre, T* __restrict y, int64_t begin, int64_t end, bool tanh_form) {
  if (tanh_form) {
#pragma omp simd
    for (int64_t e = begin; e < end; ++e) y[e] = gelu_tanh(pre[e]);
  } else {
#pragma omp simd
    for (int64_t e = begin; e < end; ++e) y[e] = gelu_erf(pre[e]);
  }
}

// dpre = dy · GELU'(pre) for rows of row blocks [block_begin, block_end), and each block's
// column sums of dpre into partial[block] (F wide).
template <typename T>
GPT1_SIMD void gelu_bwd_blocks(const T* __restrict dy, const T* __restrict pre, T* __restrict dpre,
                               T* __restrict partial, int64_t N, int64_t F, int64_t block_begin,
                               int64_t block_end, bool tanh_form) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    T* __restrict db = partial + b * F;
    std::fill(db, db + F, T(0));
    for (int64_t i = b * kRowsPerBlock; i < std::min(N, (b + 1) * kRowsPerBlock); ++i) {
      const T *dyi = dy + i * F, *zi = pre + i * F;
      T* di = dpre + i * F;
      if (tanh_form) {
#pragma omp simd
        for (int64_t j = 0; j < F; ++j) {
          di[j] = dyi[j] * gelu_tanh_grad(zi[j]);
          db[j] += di[j];
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < F; ++j) {
          di[j] = dyi[j] * gelu_erf_grad(zi[j]);
          db[j] += di[j];
        }
      }
    }
  }
}

bool is_tanh(std::string_view approximate) {
  TORCH_CHECK_VALUE(approximate == "tanh" || approximate == "none", kOp, ": approximate must be 'tanh' or 'none', got '",
              approximate, "'");
  return approximate == "tanh";
}

// Checks x (N, C) and weight (F, C) of one float dtype; returns (N, C, F).
std::tuple<int64_t, int64_t, int64_t> check_shapes(const at::Tensor& x, const at::Tensor& weight) {
  check_float(kOp, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, kOp, ": x must be 2-D (N, C), got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1), kOp, ": weight must have shape (F, ", x.size(1),
              "), got ", weight.sizes());
  return {x.size(0), x.size(1), weight.size(0)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd(const at::Tensor& x_, const at::Tensor& weight_,
                                                   const at::Tensor& bias_, c10::string_view approximate) {
  const NoAutocast no_autocast;
  const bool tanh_form = is_tanh(approximate);
  const auto [N, C, F] = check_shapes(x_, weight_);
  const auto dtype = x_.scalar_type(), cdtype = compute_dtype(dtype);
  auto weight = checked(kOp, "weight", weight_, dtype, {F, C}).to(cdtype);
  auto bias = checked(kOp, "bias", bias_, dtype, {F}).to(cdtype);
  auto x = x_.contiguous().to(cdtype);

  auto pre = at::addmm(bias, x, weight.t());  // (N, F)
  auto y = at::empty_like(pre);
  AT_DISPATCH_FLOATING_TYPES(cdtype, "linear_gelu_fwd", [&] {
    const scalar_t* p = pre.data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, N * F, grain_for(1), [&](int64_t begin, int64_t end) {
      gelu_fwd_span<scalar_t>(p, out, begin, end, tanh_form);
    });
  });
  return {y.to(dtype), pre.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd(const at::Tensor& grad_y_, const at::Tensor& x_,
                                                               const at::Tensor& weight_, const at::Tensor& pre_,
                                                               c10::string_view approximate) {
  const NoAutocast no_autocast;
  const bool tanh_form = is_tanh(approximate);
  const auto [N, C, F] = check_shapes(x_, weight_);
  const auto dtype = x_.scalar_type(), cdtype = compute_dtype(dtype);
  auto weight = checked(kOp, "weight", weight_, dtype, {F, C}).to(cdtype);
  auto grad_y = checked(kOp, "grad_y", grad_y_, dtype, {N, F}).to(cdtype);
  auto pre = checked(kOp, "pre", pre_, dtype, {N, F}).to(cdtype);
  auto x = x_.contiguous().to(cdtype);

  auto dpre = at::empty_like(pre);
  const int64_t n_blocks = n_row_blocks(N);
  auto partial = at::empty({n_blocks, F}, pre.options());
  auto grad_bias = at::empty({F}, pre.options());
  AT_DISPATCH_FLOATING_TYPES(cdtype, "linear_gelu_bwd", [&] {
    const scalar_t *dy = grad_y.data_ptr<scalar_t>(), *z = pre.data_ptr<scalar_t>();
    scalar_t *dz = dpre.data_ptr<scalar_t>(), *part = partial.data_ptr<scalar_t>();
    at::parallel_for(0, n_blocks, grain_for(kRowsPerBlock * F), [&](int64_t begin, int64_t end) {
      gelu_bwd_blocks<scalar_t>(dy, z, dz, part, N, F, begin, end, tanh_form);
    });
    sum_blocks_in_order(part, n_blocks, F, F, grad_bias.data_ptr<scalar_t>());
  });
  auto grad_x = at::mm(dpre, weight);        // (N, C)
  auto grad_weight = at::mm(dpre.t(), x);    // (F, C)
  return {grad_x.to(dtype), grad_weight.to(dtype), grad_bias.to(dtype)};
}

}  // namespace gpt1
