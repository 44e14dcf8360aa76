// add + LayerNorm on CPU: y = LN(x + dropout(r)), the join of a post-LN block.
// Spec: engine/reference.py::add_layernorm.
//
// Forward, per row i (width C):  s = x + r·m,  m_j = keep_ij / (1 − p)  (m = 1 without dropout)
//   μ = mean(s),  rstd = 1/√(var(s) + eps),  x̂ = (s − μ)·rstd,  y = x̂·γ + β
// and μ, rstd are saved in float32. Backward recomputes s (regenerating the mask from the
// seed) and x̂, then per row
//   ds = rstd · (g − mean(g) − x̂ · mean(g · x̂)),  g = dy · γ
//   dx = ds,   dr = ds · m   (returned only when p > 0; otherwise dr = dx and the caller
//                             reuses dx — no copy is written)
//   dγ = Σ_rows dy · x̂,  dβ = Σ_rows dy   (fixed blocks of rows, added in block order:
//                                          the same bits for any thread count)
// Parallel over rows (forward) and row blocks (backward); each row is one vectorised sweep
// (GPT1_SIMD picks AVX-512/AVX2 at load time).
// Dropout (bit for bit as kernels/add_layernorm.py; philox.h's keep_row): keep_ij iff
//   d(i, j) ≥ round(p·2¹⁶),  d(i, j) = 16-bit half (j mod 8) mod 2 (0: low) of word ⌊(j mod 8)/2⌋
//   of Philox4x32-7(key = (seed mod 2³², ⌊seed/2³²⌋), counter = (i, ⌊j/8⌋, 0, 0)),
// one Philox call per 8 columns; N ≤ 2³² and C ≤ 2³⁵ keep counters distinct (larger shapes are
// refused). add_layernorm_dropout_mask returns exactly the mask used.
// The residual may come in its own dtype (under autocast: a bf16 matmul output joining a float32
// stream, as F.layer_norm would see it); y and dx take x's dtype, dr the residual's.
// float16/bfloat16 run through the float32 kernel.
#include <vector>

#include "common.h"
#include "ops.h"
#include "philox.h"

namespace gpt1 {
namespace {

constexpr const char* kOp = "add_layernorm";

// uint16 scratch for a row's dropout draws: 8 per column group.
int64_t n_draws(int64_t C) { return 8 * ((C + 7) / 8); }

// Pointers of one call. Rows are contiguous with width C.
template <typename T>
struct LayerNormArgs {
  const T* x;         // (N, C) input
  const T* r;         // (N, C) residual branch (dropped out before the add)
  const T* weight;    // (C,) γ
  const T* bias;      // (C,) β (forward only)
  const T* dy;        // (N, C) upstream gradient (backward only)
  T* y;               // (N, C) forward output
  T* dx;              // (N, C) grad of x (= grad of s)
  T* dr;              // (N, C) grad of the residual, or nullptr when p == 0
  acc_t<T>* partial;  // (n_blocks, 2, C) per-block dγ, dβ sums (backward only)
  float* mean;        // (N,) saved mean
  float* rstd;        // (N,) saved 1/std
  int64_t C;
  acc_t<T> eps;
  bool dropout;       // p > 0
  Dropout16 key;      // Philox key and 16-bit threshold
  acc_t<T> scale;     // 1 / (1 − p)
};

// m_j = keep_ij / (1 − p) for row i (dropout only); `draws` is scratch for 8·⌈C/8⌉ uint16.
template <typename T>
GPT1_INLINE void mask_row(const LayerNormArgs<T>& a, int64_t i, acc_t<T>* __restrict m, uint16_t* __restrict draws) {
  keep_row<acc_t<T>>(a.key, 0, i, 0, a.C, m, draws, a.scale);
}

// s = x + r·m (m = 1 without dropout) for row i into s[]; returns Σ_j s_j.
template <typename T, bool kDropout>
GPT1_INLINE acc_t<T> add_row(const LayerNormArgs<T>& a, int64_t i, acc_t<T>* __restrict s,
                             const acc_t<T>* __restrict m) {
  using acc = acc_t<T>;
  const T *__restrict xi = a.x + i * a.C, *__restrict ri = a.r + i * a.C;
  acc sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < a.C; ++j) {
    s[j] = kDropout ? acc(xi[j]) + acc(ri[j]) * m[j] : acc(xi[j]) + acc(ri[j]);
    sum += s[j];
  }
  return sum;
}

template <typename T, bool kDropout>
GPT1_INLINE void fwd_rows_impl(const LayerNormArgs<T>& a, int64_t begin, int64_t end) {
  using acc = acc_t<T>;
  const int64_t C = a.C;
  std::vector<acc> s_buf(C), m_buf(kDropout ? C : 0);
  std::vector<uint16_t> draws(kDropout ? n_draws(C) : 0);
  acc* __restrict s = s_buf.data();
  const T *__restrict w = a.weight, *__restrict bias = a.bias;
  for (int64_t i = begin; i < end; ++i) {
    if (kDropout) mask_row(a, i, m_buf.data(), draws.data());
    const acc mu = add_row<T, kDropout>(a, i, s, m_buf.data()) / acc(C);
    acc sq = 0;  // two-pass variance: no cancellation when |mean| ≫ std
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < C; ++j) sq += (s[j] - mu) * (s[j] - mu);
    const acc rs = acc(1) / std::sqrt(sq / acc(C) + a.eps);
    T* __restrict yi = a.y + i * C;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) yi[j] = T((s[j] - mu) * rs * acc(w[j]) + acc(bias[j]));
    a.mean[i] = float(mu);
    a.rstd[i] = float(rs);
  }
}

template <typename T>
GPT1_SIMD void fwd_rows(const LayerNormArgs<T>& a, int64_t begin, int64_t end) {
  if (a.dropout) {
    fwd_rows_impl<T, true>(a, begin, end);
  } else {
    fwd_rows_impl<T, false>(a, begin, end);
  }
}

template <typename T, bool kDropout>
GPT1_INLINE void bwd_blocks_impl(const LayerNormArgs<T>& a, int64_t N, int64_t block_begin, int64_t block_end) {
  using acc = acc_t<T>;
  const int64_t C = a.C;
  std::vector<acc> xhat_buf(C), m_buf(kDropout ? C : 0), g_buf(C);
  std::vector<uint16_t> draws(kDropout ? n_draws(C) : 0);
  acc* __restrict xhat = xhat_buf.data();
  acc* __restrict g = g_buf.data();  // dy·γ
  const acc* __restrict m = m_buf.data();
  const T* __restrict w = a.weight;
  for (int64_t b = block_begin; b < block_end; ++b) {
    acc* __restrict dgamma = a.partial + b * 2 * C;
    acc* __restrict dbeta = dgamma + C;
    std::fill(dgamma, dgamma + 2 * C, acc(0));
    for (int64_t i = b * kRowsPerBlock; i < std::min(N, (b + 1) * kRowsPerBlock); ++i) {
      if (kDropout) mask_row(a, i, m_buf.data(), draws.data());
      const T *__restrict xi = a.x + i * C, *__restrict ri = a.r + i * C, *__restrict dyi = a.dy + i * C;
      const acc mu = a.mean[i], rs = a.rstd[i];
      acc sum_g = 0, sum_gx = 0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t j = 0; j < C; ++j) {
        const acc s = kDropout ? acc(xi[j]) + acc(ri[j]) * m[j] : acc(xi[j]) + acc(ri[j]);
        const acc dy = acc(dyi[j]);
        xhat[j] = (s - mu) * rs;
        g[j] = dy * acc(w[j]);
        sum_g += g[j];
        sum_gx += g[j] * xhat[j];
        dgamma[j] += dy * xhat[j];
        dbeta[j] += dy;
      }
      const acc mg = sum_g / acc(C), mgx = sum_gx / acc(C);
      T* __restrict dxi = a.dx + i * C;
      if (kDropout) {
        T* __restrict dri = a.dr + i * C;
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) {
          const acc ds = rs * (g[j] - mg - xhat[j] * mgx);
          dxi[j] = T(ds);
          dri[j] = T(ds * m[j]);
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) dxi[j] = T(rs * (g[j] - mg - xhat[j] * mgx));
      }
    }
  }
}

template <typename T>
GPT1_SIMD void bwd_blocks(const LayerNormArgs<T>& a, int64_t N, int64_t block_begin, int64_t block_end) {
  if (a.dropout) {
    bwd_blocks_impl<T, true>(a, N, block_begin, block_end);
  } else {
    bwd_blocks_impl<T, false>(a, N, block_begin, block_end);
  }
}

GPT1_SIMD void mask_rows(const Dropout16& key, int64_t C, int64_t begin, int64_t end, bool* keep) {
  std::vector<uint16_t> draws(n_draws(C));
  // bool holds 0 or 1 in one byte; writing it through uint8_t lets the compare loop vectorise
  uint8_t* out = reinterpret_cast<uint8_t*>(keep);
  for (int64_t i = begin; i < end; ++i) keep_row<uint8_t>(key, 0, i, 0, C, out + i * C, draws.data());
}

// Dropout needs rows ≤ 2³² and columns ≤ 2³⁵: Philox counters (i, ⌊j/8⌋) of 32 bits each.
void check_counter_range(const char* op, int64_t N, int64_t C, double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p == 0 || (N <= (int64_t(1) << 32) && C <= (int64_t(1) << 35)), op,
              ": dropout draws need rows <= 2**32 and columns <= 2**35 (distinct Philox counters), got ", N,
              " rows of ", C);
}

// x: the float16/bfloat16/float32/float64 activation; returns (N, C) and checks the affine params.
std::pair<int64_t, int64_t> check_shapes(const at::Tensor& x, const at::Tensor& weight) {
  check_float(kOp, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2, kOp, ": x must be 2-D (N, C), got shape ", x.sizes());
  check_float(kOp, "weight", weight);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(1), kOp, ": weight must have shape (", x.size(1),
              ",), got ", weight.sizes());
  return {x.size(0), x.size(1)};
}

// The residual: any float dtype, shape (N, C); returned contiguous.
at::Tensor checked_residual(const at::Tensor& residual, int64_t N, int64_t C) {
  check_float(kOp, "residual", residual);
  TORCH_CHECK_VALUE(residual.dim() == 2 && residual.size(0) == N && residual.size(1) == C, kOp,
              ": residual must have shape [", N, ", ", C, "] (as x), got ", residual.sizes());
  return residual.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_fwd(
    const at::Tensor& x_, const at::Tensor& residual_, const at::Tensor& weight_, const at::Tensor& bias_,
    double eps, double dropout_p, const std::optional<at::Tensor>& seed) {
  const NoAutocast no_autocast;
  const auto [N, C] = check_shapes(x_, weight_);
  const auto dtype = x_.scalar_type(), cdtype = compute_dtype(dtype);
  auto residual = checked_residual(residual_, N, C);
  check_float(kOp, "bias", bias_);
  TORCH_CHECK_VALUE(bias_.sizes() == weight_.sizes(), kOp, ": bias must have shape (", C, ",), got ", bias_.sizes());
  TORCH_CHECK_VALUE(eps >= 0, kOp, ": eps must be >= 0, got ", eps);
  const uint64_t seed_value = read_seed(kOp, dropout_p, seed);
  check_counter_range(kOp, N, C, dropout_p);

  auto x = x_.contiguous().to(cdtype), r = residual.to(cdtype);
  auto weight = weight_.contiguous().to(cdtype), bias = bias_.contiguous().to(cdtype);
  auto y = at::empty_like(x);
  auto mean = at::empty({N}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({N}, x.options().dtype(at::kFloat));

  AT_DISPATCH_FLOATING_TYPES(cdtype, "add_layernorm_fwd", [&] {
    using acc = acc_t<scalar_t>;
    LayerNormArgs<scalar_t> a{x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                              bias.data_ptr<scalar_t>(), nullptr, y.data_ptr<scalar_t>(), nullptr, nullptr,
                              nullptr, mean.data_ptr<float>(), rstd.data_ptr<float>(), C, acc(eps),
                              dropout_p > 0, Dropout16(seed_value, dropout_p), acc(1.0 / (1.0 - dropout_p))};
    at::parallel_for(0, N, grain_for(C),
                     [&](int64_t begin, int64_t end) { fwd_rows<scalar_t>(a, begin, end); });
  });
  return {y.to(dtype), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_bwd(
    const at::Tensor& grad_y_, const at::Tensor& x_, const at::Tensor& residual_, const at::Tensor& weight_,
    const at::Tensor& mean_, const at::Tensor& rstd_, double dropout_p, const std::optional<at::Tensor>& seed) {
  const NoAutocast no_autocast;
  const auto [N, C] = check_shapes(x_, weight_);
  const auto dtype = x_.scalar_type(), cdtype = compute_dtype(dtype);
  auto grad_y = checked(kOp, "grad_y", grad_y_, dtype, {N, C});
  auto residual = checked_residual(residual_, N, C);
  auto mean = checked(kOp, "mean", mean_, at::kFloat, {N});
  auto rstd = checked(kOp, "rstd", rstd_, at::kFloat, {N});
  const uint64_t seed_value = read_seed(kOp, dropout_p, seed);
  check_counter_range(kOp, N, C, dropout_p);
  const bool dropout = dropout_p > 0;

  auto dy = grad_y.to(cdtype), x = x_.contiguous().to(cdtype), r = residual.to(cdtype);
  auto weight = weight_.contiguous().to(cdtype);
  auto dx = at::empty_like(x);
  auto dr = dropout ? at::empty_like(x) : at::empty({0}, x.options());
  const int64_t n_blocks = n_row_blocks(N);
  auto partial = at::empty({n_blocks, 2, C}, x.options());
  auto dweight = at::empty({C}, x.options()), dbias = at::empty({C}, x.options());

  AT_DISPATCH_FLOATING_TYPES(cdtype, "add_layernorm_bwd", [&] {
    using acc = acc_t<scalar_t>;
    LayerNormArgs<scalar_t> a{x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                              nullptr, dy.data_ptr<scalar_t>(), nullptr, dx.data_ptr<scalar_t>(),
                              dropout ? dr.data_ptr<scalar_t>() : nullptr, partial.data_ptr<acc>(),
                              mean.data_ptr<float>(), rstd.data_ptr<float>(), C, acc(0), dropout,
                              Dropout16(seed_value, dropout_p), acc(1.0 / (1.0 - dropout_p))};
    at::parallel_for(0, n_blocks, grain_for(kRowsPerBlock * C),
                     [&](int64_t begin, int64_t end) { bwd_blocks<scalar_t>(a, N, begin, end); });
    sum_blocks_in_order(partial.data_ptr<acc>(), n_blocks, 2 * C, C, dweight.data_ptr<acc>());
    sum_blocks_in_order(partial.data_ptr<acc>() + C, n_blocks, 2 * C, C, dbias.data_ptr<acc>());
  });
  const auto wdtype = weight_.scalar_type();
  return {dx.to(dtype), dr.to(residual_.scalar_type()), dweight.to(wdtype), dbias.to(wdtype)};
}

at::Tensor add_layernorm_dropout_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double dropout_p) {
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, "add_layernorm_dropout_mask: rows and cols must be >= 0, got ", rows,
              " and ", cols);
  const uint64_t seed_value = read_seed("add_layernorm_dropout_mask", dropout_p, seed);
  check_counter_range("add_layernorm_dropout_mask", rows, cols, dropout_p);
  auto keep = at::empty({rows, cols}, seed.options().dtype(at::kBool));
  if (dropout_p == 0) return keep.fill_(true);
  const Dropout16 key(seed_value, dropout_p);
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, rows, grain_for(cols),
                   [&](int64_t begin, int64_t end) { mask_rows(key, cols, begin, end, out); });
  return keep;
}

}  // namespace gpt1
