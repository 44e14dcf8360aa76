// CPU kernels of the gpt1:: ops. Schemas (argument names, shapes, dtypes) are defined once in
// engine/ops.py (SCHEMAS); each function here has exactly that signature, and each op's
// meaning is the function of the same stem in engine/reference.py.
#pragma once

#include <torch/types.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace gpt1 {

// add_layernorm.cpp — y = LayerNorm(x + dropout(residual)), rows of width C.
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_fwd(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias,
    double eps, double dropout_p, const std::optional<at::Tensor>& seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layernorm_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& rstd, double dropout_p, const std::optional<at::Tensor>& seed);
at::Tensor add_layernorm_dropout_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double dropout_p);

}  // namespace gpt1
