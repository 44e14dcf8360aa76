// Registers the CPU kernels of the gpt1:: ops with the dispatcher.
//
// The schemas are defined once, in Python (engine/ops.py), not with TORCH_LIBRARY here: the
// CUDA path (Triton) must work on machines where this extension was never built, so the
// extension cannot own them. It only adds the CPU implementations.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(gpt1, CPU, m) {
  m.impl("attention_fwd", &gpt1::attention_fwd);
  m.impl("attention_bwd", &gpt1::attention_bwd);
  m.impl("attention_dropout_mask", &gpt1::attention_dropout_mask);
  m.impl("add_layernorm_fwd", &gpt1::add_layernorm_fwd);
  m.impl("add_layernorm_bwd", &gpt1::add_layernorm_bwd);
  m.impl("add_layernorm_dropout_mask", &gpt1::add_layernorm_dropout_mask);
  m.impl("linear_gelu_fwd", &gpt1::linear_gelu_fwd);
  m.impl("linear_gelu_bwd", &gpt1::linear_gelu_bwd);
  m.impl("linear_cross_entropy_fwd", &gpt1::linear_cross_entropy_fwd);
}
