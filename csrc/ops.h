// CPU kernels of the gpt1:: ops. Schemas (argument names, shapes, dtypes) are defined once in
// engine/ops.py (SCHEMAS); each function here has exactly that signature, and each op's
// meaning is the function of the same stem in engine/reference.py.
#pragma once

#include <torch/types.h>

#include <optional>
#include <c10/util/string_view.h>
#include <tuple>

namespace gpt1 {

// attention.cpp — causal softmax(Q Kᵀ/√D) V per head over the packed qkv (B, T, 3C), with
// attention-probability dropout.
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& qkv, int64_t n_head, double dropout_p,
                                                 const std::optional<at::Tensor>& seed);
at::Tensor attention_bwd(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                         const at::Tensor& lse, int64_t n_head, double dropout_p,
                         const std::optional<at::Tensor>& seed);
at::Tensor attention_dropout_mask(const at::Tensor& seed, int64_t batch, int64_t n_head, int64_t seq_len,
                                  double dropout_p);

// add_layernorm.cpp — y = LayerNorm(x + dropout(residual)), rows of width C.
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
    double eps, double dropout_p, const std::optional<at::Tensor>& seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double dropout_p, const std::optional<at::Tensor>& seed);
at::Tensor add_layernorm_dropout_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double dropout_p);

// linear_gelu.cpp — y = GELU(x Wᵀ + b) ("tanh" or "none"), also returning pre = x Wᵀ + b.
std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const at::Tensor& bias, c10::string_view approximate);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                               const at::Tensor& weight, const at::Tensor& pre,
                                                               c10::string_view approximate);

// linear_cross_entropy.cpp — mean CE of softmax(hidden Wᵀ) over targets != ignore_index, and
// (when compute_grad) its gradients, without materialising the (N, V) logits.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd(const at::Tensor& hidden,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& targets,
                                                                        int64_t ignore_index, bool compute_grad);

}  // namespace gpt1
