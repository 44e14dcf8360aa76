// add + LayerNorm on CPU: y = LN(x + r), the join of a post-LN block.
// Spec: engine/reference.py::add_layernorm.
//
// Forward is parallel over rows; mean and rstd are kept in float32 for backward.
// Backward recomputes x̂ = (x + r - mean)·rstd and, per row,
//   dx = rstd · (dx̂ - mean(dx̂) - x̂ · mean(dx̂ · x̂)),  dx̂ = dy · γ
// dγ = Σ_rows dy · x̂ and dβ = Σ_rows dy are reduced deterministically: fixed blocks of rows
// give partial sums, which are then added in block order (same bits for any thread count).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/types.h>

#include <cmath>
#include <vector>

#include "ops.h"

namespace gpt1 {
namespace {

constexpr int64_t kRowsPerBlock = 32;  // partial-sum granularity of dγ/dβ (fixed: determinism)

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

void check_rows(const at::Tensor& t, const char* name, int64_t N, int64_t C, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "add_layernorm: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == C, "add_layernorm: ", name,
              " must have shape (", N, ", ", C, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "add_layernorm: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_fwd(
    const at::Tensor& x_, const at::Tensor& residual_, const at::Tensor& weight_, const at::Tensor& bias_,
    double eps, double dropout_p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(x_.dim() == 2, "add_layernorm: x must be 2-D (N, C), got ", x_.sizes());
  TORCH_CHECK(dropout_p == 0.0, "add_layernorm (CPU): residual dropout is not implemented yet");
  const int64_t N = x_.size(0), C = x_.size(1);
  const auto dtype = x_.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "add_layernorm (CPU): x must be float32 or float64, got ", dtype);
  check_rows(residual_, "residual", N, C, dtype);
  TORCH_CHECK(weight_.numel() == C && bias_.numel() == C, "add_layernorm: weight and bias must have ",
              C, " elements, got ", weight_.numel(), " and ", bias_.numel());
  auto x = x_.contiguous(), r = residual_.contiguous();
  auto weight = weight_.to(dtype).contiguous(), bias = bias_.to(dtype).contiguous();
  auto y = at::empty_like(x);
  auto mean = at::empty({N}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({N}, x.options().dtype(at::kFloat));

  AT_DISPATCH_FLOATING_TYPES(dtype, "add_layernorm_fwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t *px = x.data_ptr<scalar_t>(), *pr = r.data_ptr<scalar_t>();
    const scalar_t *pw = weight.data_ptr<scalar_t>(), *pb = bias.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    float *pm = mean.data_ptr<float>(), *ps = rstd.data_ptr<float>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> s(C);
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t *xi = px + i * C, *ri = pr + i * C;
        acc sum = 0;
        for (int64_t j = 0; j < C; ++j) {
          s[j] = acc(xi[j]) + acc(ri[j]);
          sum += s[j];
        }
        const acc mu = sum / C;
        acc var = 0;
        for (int64_t j = 0; j < C; ++j) var += (s[j] - mu) * (s[j] - mu);
        const acc rs = acc(1) / std::sqrt(var / C + acc(eps));
        scalar_t* yi = py + i * C;
        for (int64_t j = 0; j < C; ++j) yi[j] = scalar_t((s[j] - mu) * rs * acc(pw[j]) + acc(pb[j]));
        pm[i] = float(mu);
        ps[i] = float(rs);
      }
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_bwd(
    const at::Tensor& grad_y_, const at::Tensor& x_, const at::Tensor& residual_, const at::Tensor& weight_,
    const at::Tensor& mean_, const at::Tensor& rstd_, double dropout_p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(x_.dim() == 2, "add_layernorm: x must be 2-D (N, C), got ", x_.sizes());
  TORCH_CHECK(dropout_p == 0.0, "add_layernorm (CPU): residual dropout is not implemented yet");
  const int64_t N = x_.size(0), C = x_.size(1);
  const auto dtype = x_.scalar_type();
  check_rows(grad_y_, "grad_y", N, C, dtype);
  check_rows(residual_, "residual", N, C, dtype);
  auto dy = grad_y_.contiguous(), x = x_.contiguous(), r = residual_.contiguous();
  auto weight = weight_.to(dtype).contiguous();
  auto mean = mean_.contiguous(), rstd = rstd_.contiguous();
  auto dx = at::empty_like(x);
  const int64_t n_blocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  auto partial = at::zeros({n_blocks, 2, C}, x.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat));

  AT_DISPATCH_FLOATING_TYPES(dtype, "add_layernorm_bwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t *pdy = dy.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>(), *pr = r.data_ptr<scalar_t>();
    const scalar_t* pw = weight.data_ptr<scalar_t>();
    const float *pm = mean.data_ptr<float>(), *ps = rstd.data_ptr<float>();
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    acc* pp = partial.data_ptr<acc>();
    at::parallel_for(0, n_blocks, 1, [&](int64_t bbegin, int64_t bend) {
      std::vector<acc> xhat(C), g(C);
      for (int64_t b = bbegin; b < bend; ++b) {
        acc *dgamma = pp + b * 2 * C, *dbeta = dgamma + C;
        for (int64_t i = b * kRowsPerBlock; i < std::min(N, (b + 1) * kRowsPerBlock); ++i) {
          const scalar_t *dyi = pdy + i * C, *xi = px + i * C, *ri = pr + i * C;
          const acc mu = pm[i], rs = ps[i];
          acc sum_g = 0, sum_gx = 0;
          for (int64_t j = 0; j < C; ++j) {
            xhat[j] = (acc(xi[j]) + acc(ri[j]) - mu) * rs;
            g[j] = acc(dyi[j]) * acc(pw[j]);
            sum_g += g[j];
            sum_gx += g[j] * xhat[j];
            dgamma[j] += acc(dyi[j]) * xhat[j];
            dbeta[j] += acc(dyi[j]);
          }
          const acc mg = sum_g / C, mgx = sum_gx / C;
          scalar_t* dxi = pdx + i * C;
          for (int64_t j = 0; j < C; ++j) dxi[j] = scalar_t(rs * (g[j] - mg - xhat[j] * mgx));
        }
      }
    });
  });
  auto sums = partial.sum(0);  // (2, C), reduced in block order
  auto dweight = sums[0].to(weight_.scalar_type());
  auto dbias = sums[1].to(weight_.scalar_type());
  return {dx, at::empty({0}, x.options()), dweight, dbias};
}

}  // namespace gpt1
