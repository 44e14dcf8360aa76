// Linear + cross-entropy on CPU: the tied LM head and its loss, chunked so that the (N, V)
// logits never exist whole. Spec: engine/reference.py::linear_cross_entropy.
//
//   loss = (1/n) Σ_{i kept} (lse_i − z_i,t_i),  z_i = h_i Wᵀ,  lse_i = log Σ_v e^z_iv
// over the n rows whose target is not ignore_index (NaN when n = 0, as F.cross_entropy). With
// compute_grad the gradients of that mean come out of the same pass (the backward only scales
// them by the upstream gradient, engine/ops.py):
//   G_i = (softmax(z_i) − onehot(t_i)) / n   (0 for ignored rows),  grad_h = G W,  grad_W = Gᵀ h
//
// Rows go in chunks (sized below, kTargetElems): per chunk Z = h Wᵀ (ATen → MKL, all threads),
// then one parallel vectorised sweep per row (max; Σ e^(z − max) with e^(z − max) kept in place;
// loss; Z ← G), then grad_h[chunk] = G W and grad_W += Gᵀ h[chunk] (MKL). Per-row losses are
// summed in row order at the end, and grad_W is accumulated chunk by chunk in order, so the
// result does not depend on the thread count. float16/bfloat16 run through the float32 kernel
// (hidden and weight upcast once; gradients cast back).
#include <algorithm>
#include <vector>

#include "common.h"
#include "ops.h"

namespace gpt1 {
namespace {

constexpr const char* kOp = "linear_cross_entropy";
// Rows per chunk: about 2^22 logits (16 MiB in float32, so a chunk stays cache-resident from its
// GEMM through the softmax pass to the two gradient GEMMs: -8% time at V = 8192, C = 256), but at
// least kMinRows (each chunk costs one more pass over grad_W, large at GPT-1's V x C) and at most
// 2^24 logits. V = 8192: 512 rows; V = 40478: 256 rows (unchanged time against 414).
constexpr int64_t kTargetElems = int64_t(1) << 22, kMaxElems = int64_t(1) << 24, kMinRows = 256;

// Row i of a logits chunk: returns lse − z_t (0 if ignored); with write_grad overwrites z by
// G_i = (softmax(z) − onehot(t)) · inv_n, or by 0 for an ignored row.
template <typename scalar_t>
GPT1_SIMD scalar_t row_loss(scalar_t* __restrict z, int64_t V, int64_t target, bool valid, scalar_t inv_n,
                            bool write_grad) {
  scalar_t mx = z[0];
#pragma omp simd reduction(max : mx)
  for (int64_t v = 0; v < V; ++v) mx = std::max(mx, z[v]);
  const scalar_t z_target = valid ? z[target] : scalar_t(0);
  scalar_t sum = 0;
  if (write_grad) {
#pragma omp simd reduction(+ : sum)
    for (int64_t v = 0; v < V; ++v) {
      z[v] = exp_fast(z[v] - mx);  // kept for the softmax below
      sum += z[v];
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t v = 0; v < V; ++v) sum += exp_fast(z[v] - mx);
  }
  if (write_grad) {
    const scalar_t w = valid ? inv_n / sum : scalar_t(0);  // softmax_v / n = e_v · (1/n) / Σe
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) z[v] *= w;
    if (valid) z[target] -= inv_n;
  }
  return valid ? mx + std::log(sum) - z_target : scalar_t(0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd(const at::Tensor& hidden_,
                                                                        const at::Tensor& weight_,
                                                                        const at::Tensor& targets_,
                                                                        int64_t ignore_index, bool compute_grad) {
  const NoAutocast no_autocast;
  check_float(kOp, "hidden", hidden_);
  TORCH_CHECK_VALUE(hidden_.dim() == 2, kOp, ": hidden must be 2-D (N, C), got shape ", hidden_.sizes());
  const int64_t N = hidden_.size(0), C = hidden_.size(1);
  const auto dtype = hidden_.scalar_type(), cdtype = compute_dtype(dtype);
  TORCH_CHECK_VALUE(weight_.dim() == 2 && weight_.size(1) == C && weight_.size(0) >= 1, kOp,
              ": weight must have shape (V, ", C, ") with V >= 1, got ", weight_.sizes());
  const int64_t V = weight_.size(0);
  auto weight = checked(kOp, "weight", weight_, dtype, {V, C}).to(cdtype);
  auto targets = checked(kOp, "targets", targets_, at::kLong, {N});
  auto hidden = hidden_.contiguous().to(cdtype);

  const int64_t* t = targets.data_ptr<int64_t>();
  int64_t n_valid = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (t[i] == ignore_index) continue;
    TORCH_CHECK_VALUE(t[i] >= 0 && t[i] < V, kOp, ": targets[", i, "] = ", t[i], " is outside [0, ", V,
                ") and is not ignore_index = ", ignore_index);
    ++n_valid;
  }

  const int64_t rows = std::max<int64_t>(1, std::min({N, std::max(kTargetElems / V, kMinRows), kMaxElems / V}));
  auto logits = at::empty({rows, V}, hidden.options());
  std::vector<double> losses(N);
  auto grad_hidden = compute_grad ? at::empty_like(hidden) : at::empty({0}, hidden_.options());
  // grad_W: zeros when there are no rows, else written by the first chunk
  auto grad_weight = compute_grad ? (N == 0 ? at::zeros_like(weight) : at::empty_like(weight))
                                  : at::empty({0}, weight_.options());

  AT_DISPATCH_FLOATING_TYPES(cdtype, "linear_cross_entropy_fwd", [&] {
    const scalar_t inv_n = n_valid > 0 ? scalar_t(1.0 / double(n_valid)) : scalar_t(0);
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
      const int64_t m = std::min(N, r0 + rows) - r0;
      auto h = hidden.narrow(0, r0, m);
      auto z = logits.narrow(0, 0, m);
      at::mm_out(z, h, weight.t());  // (m, V) logits of this chunk
      scalar_t* zp = z.data_ptr<scalar_t>();
      at::parallel_for(0, m, grain_for(V), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t target = t[r0 + r];
          const bool valid = target != ignore_index;
          losses[r0 + r] = double(row_loss<scalar_t>(zp + r * V, V, valid ? target : 0, valid, inv_n, compute_grad));
        }
      });
      if (compute_grad) {
        auto grad_h = grad_hidden.narrow(0, r0, m);
        at::mm_out(grad_h, z, weight);  // G W
        if (r0 == 0) {
          at::mm_out(grad_weight, z.t(), h);  // Gᵀ h
        } else {
          grad_weight.addmm_(z.t(), h);  // += Gᵀ h
        }
      }
    }
  });
  double total = 0;  // the mean over kept rows, summed in row order (NaN when all are ignored: 0/0)
  for (const double l : losses) total += l;
  auto loss = at::scalar_tensor(total / double(n_valid), hidden_.options().dtype(at::kFloat));
  if (!compute_grad) return {loss, grad_hidden, grad_weight};
  return {loss, grad_hidden.to(dtype), grad_weight.to(weight_.scalar_type())};
}

}  // namespace gpt1
