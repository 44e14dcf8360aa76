// Fused causal attention on CPU, FlashAttention-2 style. Spec: engine/reference.py::causal_attention.
//
// Per head (b, h), with D the head size, scale = 1/√D, Z = keep/(1 − p) (Z = 1 without dropout):
//   S = scale·Q Kᵀ (S_ij = −∞ for j > i),  P = softmax(S),  O = (P ∘ Z) V,  lse_i = log Σ_j e^S_ij
// Q, K, V are read in place from the packed qkv (B, T, 3C) rows (head h: columns h·D + [0, D) of
// each third, leading dimension 3C); O is written to (B, T, C), heads side by side.
//
// Forward: one task per (b, h, block of kBlockQ queries), run in parallel (at::parallel_for).
// A task streams key blocks of kBlockK up to its last query (blocks above the diagonal are never
// touched) with an online softmax: S = Q Kᵀ and O += (P ∘ Z) V are small GEMMs on the tiles
// (tile_gemm, single-threaded inside the parallel region); the row max/exp/sum/rescale sweeps are
// vectorised (GPT1_SIMD). Only a kBlockQ × kBlockK score tile exists per task, never T × T.
// lse is saved (fp32), so backward recomputes P exactly.
//
// Backward: delta_i = Σ_d dO_id O_id, then per block j of kBlockKb keys and each strip i of up
// to kBlockQb queries from the diagonal down (tall tiles: few GEMM calls, little masked work):
//   P = exp(S − lse),  dV_j += (P ∘ Z)ᵀ dO_i,  dP = (dO_i V_jᵀ) ∘ Z,  dS = P ∘ (dP − delta_i),
//   dK_j += scale·dSᵀ Q_i,  dQ_i += scale·dS K_j
// accumulated straight into the packed grad_qkv (B, T, 3C). One task per (b, h) owns all of that
// head's dQ, dK, dV: no two tasks write the same element, and each is summed in a fixed order
// (deterministic, no atomics).
//
// Dropout: the keep mask is a pure function of (seed, b, h, i, j) — Philox4x32-7 as the Triton
// kernel draws it (philox.h) — regenerated in backward and by attention_dropout_mask; no mask
// is stored.
//
// float32: the tiles' GEMMs are ATen's mm (MKL) on views, transposes included. bfloat16: every
// GEMM reads bf16 operands (qkv and dO as given; P and dS rounded to bf16 once as operands, as
// PyTorch's own bf16 attention rounds them) and accumulates into float32 in place (ATen's brgemm,
// bf16 × bf16 → fp32, with a transposed operand copied out first): S = Q Kᵀ and dP' = dO Vᵀ, which
// feed exp() and the dP − delta cancellation, are exact float32 sums, and O, dQ, dK, dV never
// round across tiles. Softmax, lse and delta are float32. float16 runs through the float32 kernel.
#include <vector>

#include "common.h"
#include "ops.h"
#include "philox.h"

namespace gpt1 {
namespace {

constexpr const char* kOp = "attention";
constexpr int64_t kBlockQ = 64;    // queries per forward task
constexpr int64_t kBlockK = 256;   // keys per forward score tile
constexpr int64_t kBlockKb = 64;   // keys per backward block
constexpr int64_t kBlockQb = 256;  // queries per backward tile

// Geometry of one call: batch, tokens, heads, head size, width; strides of the packed layouts.
struct Geometry {
  int64_t B, T, H, D, C;
  int64_t qkv_row() const { return 3 * C; }  // leading dimension of qkv / grad_qkv
};

template <typename scalar_t>
struct Dropout {
  bool on;                // p > 0
  Dropout8 draw;          // Philox key and 8-bit threshold
  scalar_t scale;         // 1 / (1 − p)
};

// Scratch of one thread, sized for the largest tile (rows × cols scores, head size D): float
// tiles in acc_t<T>; with T = bfloat16 also `operand` (a float tile rounded to bf16 for the next
// GEMM) and `transposed` (tile_gemm's copy of a transposed operand).
template <typename T>
struct Scratch {
  using acc = acc_t<T>;
  static constexpr bool kLowp = !std::is_same_v<T, acc>;
  std::vector<acc> s, o, z, row_max, row_sum, keep;
  std::vector<T> operand, transposed;
  std::vector<uint8_t> draws;
  Scratch(int64_t rows, int64_t cols, int64_t D, bool dropout)
      : s(rows * cols), o(rows * std::max(D, cols)), z(dropout ? rows * cols : 0), row_max(rows), row_sum(rows),
        keep(cols), operand(kLowp ? rows * cols : 0), transposed(kLowp ? std::max(rows, D) * cols : 0),
        draws(32 * (cols / 32 + 2)) {}
  // The float tile t (n elements) as a GEMM operand in T: t itself, or rounded into `operand`.
  const T* as_operand(const acc* t, int64_t n) {
    if constexpr (kLowp) {
      store_tile<T>(t, operand.data(), n);
      return operand.data();
    } else {
      return t;
    }
  }
  // C (+)= op(A)·op(B) on this thread's scratch (see tile_gemm).
  void gemm(int64_t m, int64_t n, int64_t k, Tile<T> a, Tile<T> b, bool accumulate, acc* c, int64_t ldc) {
    tile_gemm<T>(m, n, k, a, b, accumulate, c, ldc, transposed.data());
  }
};

// keep[j] = Z_ij = keep_ij / (1 − p) for query i, keys j0 + [0, n).
template <typename scalar_t>
GPT1_INLINE void dropout_row(const Dropout<scalar_t>& d, uint32_t bh, int64_t i, int64_t j0, int64_t n,
                             scalar_t* __restrict keep, uint8_t* draws) {
  attention_keep_row(d.draw, bh, i, j0, j0 + n, keep, draws);
  const scalar_t scale = d.scale;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) keep[j] *= scale;
}

// Forward online-softmax update of the tile s = Q Kᵀ (m × n, ld n) of queries i0 + r, keys j0 + j,
// with x_j = scale·s_j:
//   m' = max(m, max_j x_j),  p_j = e^(x_j − m'),  l' = l·e^(m − m') + Σ_j p_j,  O_r ← O_r·e^(m − m')
// then p ← p ∘ Z. Masked keys (j0 + j > i0 + r) get p = 0. `first`: no previous block (O unset).
template <typename scalar_t>
GPT1_SIMD void fwd_softmax_tile(scalar_t* __restrict s, int64_t m, int64_t n, int64_t i0, int64_t j0, bool first,
                                scalar_t scale, scalar_t* __restrict row_max, scalar_t* __restrict row_sum,
                                scalar_t* __restrict o, int64_t D, const Dropout<scalar_t>& drop, uint32_t bh,
                                scalar_t* __restrict keep, uint8_t* draws) {
  for (int64_t r = 0; r < m; ++r) {
    scalar_t* __restrict row = s + r * n;
    const int64_t nv = std::min(n, i0 + r - j0 + 1);  // keys j0 .. i of this row
    if (nv <= 0) {
      std::fill(row, row + n, scalar_t(0));
      continue;
    }
    // Whole-row sweeps with the causal mask as a select: no scalar remainder loops (n is a
    // multiple of the vector width except at the sequence's end).
    scalar_t mx = row[0];
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, j < nv ? row[j] : row[0]);
    mx *= scale;  // scale > 0: the max of the scaled row, rounded alike
    const scalar_t m_new = first ? mx : std::max(row_max[r], mx);
    scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      row[j] = j < nv ? exp_fast(row[j] * scale - m_new) : scalar_t(0);
      sum += row[j];
    }
    if (first) {
      row_sum[r] = sum;
    } else {
      const scalar_t alpha = exp_fast(row_max[r] - m_new);
      row_sum[r] = row_sum[r] * alpha + sum;
      scalar_t* __restrict orow = o + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) orow[d] *= alpha;
    }
    row_max[r] = m_new;
    if (drop.on) {
      dropout_row(drop, bh, i0 + r, j0, n, keep, draws);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) row[j] *= keep[j];
    }
  }
}

// out_r = O_r / l_r (into out, ld C, rounded to T) and lse_r = m_r + log l_r.
template <typename T>
GPT1_SIMD void fwd_finish(const acc_t<T>* __restrict o, const acc_t<T>* __restrict row_max,
                          const acc_t<T>* __restrict row_sum, int64_t m, int64_t D, T* __restrict out,
                          int64_t ld_out, float* __restrict lse) {
  using acc = acc_t<T>;
  for (int64_t r = 0; r < m; ++r) {
    const acc inv = acc(1) / row_sum[r];
    const acc* __restrict orow = o + r * D;
    T* __restrict dst = out + r * ld_out;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) store(dst, d, orow[d] * inv);
    lse[r] = float(row_max[r] + std::log(row_sum[r]));
  }
}

template <typename T>
void fwd_task(const Geometry& g, int64_t task, const T* qkv, T* out, float* lse, const Dropout<acc_t<T>>& drop,
              Scratch<T>& sc) {
  using acc = acc_t<T>;
  const int64_t n_qblocks = (g.T + kBlockQ - 1) / kBlockQ;
  const int64_t bh = task / n_qblocks, b = bh / g.H, h = bh % g.H;
  const int64_t i0 = (task % n_qblocks) * kBlockQ, i1 = std::min(g.T, i0 + kBlockQ), m = i1 - i0;
  const int64_t ld = g.qkv_row();
  const acc scale = acc(1) / std::sqrt(acc(g.D));
  const int64_t q_at = (b * g.T + i0) * ld + h * g.D;
  for (int64_t j0 = 0; j0 < i1; j0 += kBlockK) {  // key blocks up to the diagonal
    const int64_t n = std::min(i1, j0 + kBlockK) - j0;
    const int64_t k_at = (b * g.T + j0) * ld + g.C + h * g.D;
    const T* v = qkv + k_at + g.C;
    sc.gemm(m, n, g.D, {qkv + q_at, ld}, {qkv + k_at, ld, true}, false, sc.s.data(), n);  // S = Q Kᵀ
    fwd_softmax_tile<acc>(sc.s.data(), m, n, i0, j0, j0 == 0, scale, sc.row_max.data(), sc.row_sum.data(),
                          sc.o.data(), g.D, drop, uint32_t(bh), sc.keep.data(), sc.draws.data());
    const T* p = sc.as_operand(sc.s.data(), m * n);
    sc.gemm(m, g.D, n, {p, n}, {v, ld}, j0 != 0, sc.o.data(), g.D);  // O (+)= P V
  }
  fwd_finish<T>(sc.o.data(), sc.row_max.data(), sc.row_sum.data(), m, g.D, out + (b * g.T + i0) * g.C + h * g.D,
                g.C, lse + bh * g.T + i0);
}

// delta_t = Σ_d dO_td O_td for the T rows of one head (dO, O: ld C), in acc_t<T>.
template <typename T>
GPT1_SIMD void bwd_delta(const T* __restrict dout, const T* __restrict out, int64_t rows, int64_t D, int64_t ld,
                         acc_t<T>* __restrict delta) {
  for (int64_t t = 0; t < rows; ++t) {
    acc_t<T> sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < D; ++d) sum += load(dout, t * ld + d) * load(out, t * ld + d);
    delta[t] = sum;
  }
}

// P = exp(scale·S − lse) on the tile s = Q Kᵀ (m × n, ld n) of queries i0 + r, keys j0 + j (0 above
// the diagonal); with dropout also z = Z (the scaled keep mask) and pz = P ∘ Z.
template <typename scalar_t>
GPT1_SIMD void bwd_probs_tile(scalar_t* __restrict s, int64_t m, int64_t n, int64_t i0, int64_t j0, scalar_t scale,
                              const float* __restrict lse, const Dropout<scalar_t>& drop, uint32_t bh,
                              scalar_t* __restrict z, scalar_t* __restrict pz, uint8_t* draws) {
  for (int64_t r = 0; r < m; ++r) {
    scalar_t* __restrict row = s + r * n;
    const int64_t nv = std::max<int64_t>(0, std::min(n, i0 + r - j0 + 1));
    const scalar_t l = scalar_t(lse[r]);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] = j < nv ? exp_fast(row[j] * scale - l) : scalar_t(0);
    if (drop.on) {
      scalar_t* __restrict zr = z + r * n;
      scalar_t* __restrict pzr = pz + r * n;
      dropout_row(drop, bh, i0 + r, j0, n, zr, draws);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) pzr[j] = row[j] * zr[j];
    }
  }
}

// scale·dS = scale·P ∘ (dP' ∘ Z − delta) in place of dp (= dP' = dO Vᵀ on entry), tiles m × n, ld n:
// the gradient of S = Q Kᵀ itself, so dK and dQ need no further scaling.
template <typename scalar_t>
GPT1_SIMD void bwd_dscores_tile(const scalar_t* __restrict p, scalar_t* __restrict dp, const scalar_t* __restrict z,
                                const scalar_t* __restrict delta, scalar_t scale, int64_t m, int64_t n) {
  for (int64_t r = 0; r < m; ++r) {
    const scalar_t dr = delta[r];
    const scalar_t* __restrict prow = p + r * n;
    scalar_t* __restrict row = dp + r * n;
    if (z) {
      const scalar_t* __restrict zr = z + r * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) row[j] = scale * prow[j] * (row[j] * zr[j] - dr);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) row[j] = scale * prow[j] * (row[j] - dr);
    }
  }
}

// One head's dQ, dK, dV into dqkv, the (B, T, 3C) gradient in acc_t<T> (float32 accumulators for bf16).
template <typename T>
void bwd_head(const Geometry& g, int64_t bh, const T* dout, const T* qkv, const T* out, const float* lse,
              acc_t<T>* dqkv, const Dropout<acc_t<T>>& drop, Scratch<T>& sc, std::vector<acc_t<T>>& delta,
              std::vector<acc_t<T>>& dp) {
  using acc = acc_t<T>;
  const int64_t b = bh / g.H, h = bh % g.H, ld = g.qkv_row(), D = g.D, C = g.C;
  const acc scale = acc(1) / std::sqrt(acc(D));
  const int64_t dout_at = b * g.T * C + h * D, q_at = b * g.T * ld + h * D;
  const T* dout_h = dout + dout_at;
  bwd_delta<T>(dout_h, out + dout_at, g.T, D, C, delta.data());
  const T* q_h = qkv + q_at;
  acc* dq_h = dqkv + q_at;
  for (int64_t t = 0; t < g.T; ++t) std::fill(dq_h + t * ld, dq_h + t * ld + D, acc(0));
  const float* lse_h = lse + bh * g.T;
  for (int64_t j0 = 0; j0 < g.T; j0 += kBlockKb) {
    const int64_t n = std::min(g.T, j0 + kBlockKb) - j0;
    const T* k = q_h + j0 * ld + C;
    acc* dk = dq_h + j0 * ld + C;
    acc* dv = dk + C;
    for (int64_t i0 = j0; i0 < g.T; i0 += kBlockQb) {  // queries at and below the diagonal
      const int64_t m = std::min(g.T, i0 + kBlockQb) - i0;
      const bool add = i0 != j0;  // the first strip of a key block writes dK, dV
      const T* q = q_h + i0 * ld;
      const T* dout_i = dout_h + i0 * C;
      acc *s = sc.s.data(), *pz = drop.on ? sc.o.data() : s, *z = drop.on ? sc.z.data() : nullptr;
      sc.gemm(m, n, D, {q, ld}, {k, ld, true}, false, s, n);  // S = Q Kᵀ
      bwd_probs_tile<acc>(s, m, n, i0, j0, scale, lse_h + i0, drop, uint32_t(bh), z, pz, sc.draws.data());
      sc.gemm(n, D, m, {sc.as_operand(pz, m * n), n, true}, {dout_i, C}, add, dv, ld);  // dV += (P∘Z)ᵀ dO
      sc.gemm(m, n, D, {dout_i, C}, {k + C, ld, true}, false, dp.data(), n);             // dP' = dO Vᵀ
      bwd_dscores_tile<acc>(s, dp.data(), z, delta.data() + i0, scale, m, n);            // scale·dS
      const T* ds = sc.as_operand(dp.data(), m * n);
      sc.gemm(n, D, m, {ds, n, true}, {q, ld}, add, dk, ld);                  // dK += scale·dSᵀ Q
      sc.gemm(m, D, n, {ds, n}, {k, ld}, true, dq_h + i0 * ld, ld);           // dQ += scale·dS K
    }
  }
}

// Checks qkv (B, T, 3C) with C divisible by n_head; returns the geometry.
Geometry check_qkv(const at::Tensor& qkv, int64_t n_head) {
  check_float(kOp, "qkv", qkv);
  TORCH_CHECK_VALUE(qkv.dim() == 3, kOp, ": qkv must be 3-D (B, T, 3C), got shape ", qkv.sizes());
  TORCH_CHECK_VALUE(n_head >= 1, kOp, ": n_head must be >= 1, got ", n_head);
  TORCH_CHECK_VALUE(qkv.size(2) % (3 * n_head) == 0 && qkv.size(2) > 0, kOp, ": qkv's last dimension must be 3C with C ",
              "divisible by n_head = ", n_head, ", got ", qkv.size(2));
  const int64_t C = qkv.size(2) / 3;
  return {qkv.size(0), qkv.size(1), n_head, C / n_head, C};
}

template <typename scalar_t>
Dropout<scalar_t> make_dropout(double dropout_p, const std::optional<at::Tensor>& seed) {
  const uint64_t seed_value = read_seed(kOp, dropout_p, seed);
  return {dropout_p > 0, Dropout8(seed_value, dropout_p), scalar_t(1.0 / (1.0 - dropout_p))};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& qkv_, int64_t n_head, double dropout_p,
                                                 const std::optional<at::Tensor>& seed) {
  const NoAutocast no_autocast;
  const Geometry g = check_qkv(qkv_, n_head);
  const auto dtype = qkv_.scalar_type(), cdtype = compute_dtype(dtype);
  auto qkv = qkv_.contiguous().to(cdtype);
  auto out = at::empty({g.B, g.T, g.C}, qkv.options());
  auto lse = at::empty({g.B, g.H, g.T}, qkv.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, cdtype, "attention_fwd", [&] {
    const auto drop = make_dropout<acc_t<scalar_t>>(dropout_p, seed);
    const scalar_t* q = qkv.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    float* l = lse.data_ptr<float>();
    const int64_t n_tasks = g.B * g.H * ((g.T + kBlockQ - 1) / kBlockQ);
    at::parallel_for(0, n_tasks, grain_for(kBlockQ * g.T * g.D), [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> sc(kBlockQ, kBlockK, g.D, drop.on);
      for (int64_t task = begin; task < end; ++task) fwd_task<scalar_t>(g, task, q, o, l, drop, sc);
    });
  });
  return {out.to(dtype), lse};
}

at::Tensor attention_bwd(const at::Tensor& grad_out_, const at::Tensor& qkv_, const at::Tensor& out_,
                         const at::Tensor& lse_, int64_t n_head, double dropout_p,
                         const std::optional<at::Tensor>& seed) {
  const NoAutocast no_autocast;
  const Geometry g = check_qkv(qkv_, n_head);
  const auto dtype = qkv_.scalar_type(), cdtype = compute_dtype(dtype);
  auto grad_out = checked(kOp, "grad_out", grad_out_, dtype, {g.B, g.T, g.C}).to(cdtype);
  auto out = checked(kOp, "out", out_, dtype, {g.B, g.T, g.C}).to(cdtype);
  auto lse = checked(kOp, "lse", lse_, at::kFloat, {g.B, g.H, g.T});
  auto qkv = qkv_.contiguous().to(cdtype);
  auto grad_qkv = at::empty(qkv.sizes(), qkv.options().dtype(acc_dtype(cdtype)));  // summed in acc_t
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, cdtype, "attention_bwd", [&] {
    using acc = acc_t<scalar_t>;
    const auto drop = make_dropout<acc>(dropout_p, seed);
    at::parallel_for(0, g.B * g.H, grain_for(g.T * g.T * g.D), [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> sc(kBlockQb, kBlockKb, g.D, drop.on);
      std::vector<acc> delta(g.T), dp(kBlockQb * kBlockKb);
      for (int64_t bh = begin; bh < end; ++bh) {
        bwd_head<scalar_t>(g, bh, grad_out.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                           lse.data_ptr<float>(), grad_qkv.data_ptr<acc>(), drop, sc, delta, dp);
      }
    });
  });
  return grad_qkv.to(dtype);
}

at::Tensor attention_dropout_mask(const at::Tensor& seed, int64_t batch, int64_t n_head, int64_t seq_len,
                                  double dropout_p) {
  TORCH_CHECK_VALUE(batch >= 0 && n_head >= 1 && seq_len >= 0, "attention_dropout_mask: need batch >= 0, n_head >= 1, ",
              "seq_len >= 0, got ", batch, ", ", n_head, ", ", seq_len);
  const uint64_t seed_value = read_seed("attention_dropout_mask", dropout_p, seed);
  auto keep = at::empty({batch, n_head, seq_len, seq_len}, seed.options().dtype(at::kBool));
  if (dropout_p == 0) return keep.fill_(true);
  const Dropout8 draw(seed_value, dropout_p);
  bool* dst = keep.data_ptr<bool>();
  at::parallel_for(0, batch * n_head * seq_len, grain_for(seq_len), [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> row(seq_len);
    std::vector<uint8_t> draws(32 * (seq_len / 32 + 2));
    for (int64_t r = begin; r < end; ++r) {  // r = (b·H + h)·T + i
      attention_keep_row(draw, uint32_t(r / seq_len), r % seq_len, 0, seq_len, row.data(), draws.data());
      std::copy(row.begin(), row.end(), dst + r * seq_len);
    }
  });
  return keep;
}

}  // namespace gpt1
