"""One attention tile GEMM per call: ATen's mm, as csrc/ calls it today, against ATen's cpublas::brgemm.

csrc/attention.cpp runs each tile through at::mm_out on from_blob views: a dispatcher call, then MKL or oneDNN.
cpublas::brgemm (ATen/native/CPUBlas.h, exported by libtorch_cpu) calls a JIT micro-kernel directly, row-major,
C (+)= A·B with no transposes and no alpha. Its float form runs oneDNN's micro-kernel on AVX2 and up, else a
plain GEMM; its bfloat16 → float form needs B packed to VNNI (cpublas::pack), which only a CPU with AMX has
(cpublas::could_pack); without it brgemm falls back to ATen's plain bf16 GEMM. This prints µs per call at the
kernel's tile shapes on one thread, and checks each form computes the same product:

    python -m bench.gemm_calls [--iters N]

Results: bench/results/cpu-epyc-2026-12-07.md (the header line names the CPU).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.cpp_extension import load_inline

from engine.training.precision import cpu_bf16_isa, cpu_model

# (m, n, k) of csrc/attention.cpp's tiles, D = 64: forward S = QKᵀ and O += PV; backward S, dP' (256 × 64 × 64)
# and dV, dK (64 × 64 × 256); dQ (256 × 64 × 64).
TILES = [(64, 256, 64), (64, 64, 256), (256, 64, 64)]

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>
#include <chrono>

namespace cb = at::native::cpublas;

// µs per call of f over `iters` calls (after 10 warm-up calls).
template <typename F> double per_call(int64_t iters, F f) {
  for (int i = 0; i < 10; ++i) f();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) f();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / iters;
}

// C = A·B (A m×k, B k×n; float or bfloat16 operands) by at::mm_out into C's dtype, and by brgemm into float
// (B packed to VNNI where could_pack). Returns {mm µs, brgemm µs, max |difference| of the two products, vnni}.
std::vector<double> compare(at::Tensor a, at::Tensor b, int64_t iters) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const bool bf16 = a.scalar_type() == at::kBFloat16;
  auto c_mm = at::empty({m, n}, a.options()), c_br = at::empty({m, n}, a.options().dtype(at::kFloat));
  const double t_mm = per_call(iters, [&] { at::mm_out(c_mm, a, b); });
  double t_br;
  bool vnni = false;
  if (!bf16) {
    t_br = per_call(iters, [&] {
      cb::brgemm(m, n, k, k, n, n, false, a.data_ptr<float>(), b.data_ptr<float>(), c_br.data_ptr<float>(), false);
    });
  } else {
    vnni = cb::could_pack(at::kBFloat16);
    auto packed = at::empty_like(b);  // VNNI layout of B, packed once outside the timed loop (as a kernel would)
    if (vnni) cb::pack(k, n, n, n, at::kBFloat16, at::kBFloat16, b.data_ptr(), packed.data_ptr());
    const auto* bp = (vnni ? packed : b).data_ptr<at::BFloat16>();
    t_br = per_call(iters, [&] {
      cb::brgemm(m, n, k, k, n, n, false, a.data_ptr<at::BFloat16>(), bp, c_br.data_ptr<float>(), vnni);
    });
    cb::brgemm_release(vnni);
  }
  const double diff = (c_mm.to(at::kFloat) - c_br).abs().max().item<double>();
  return {t_mm, t_br, diff, double(vnni)};
}
"""


def build():
    """The probe's extension (JIT-built once per torch version into torch's extension cache)."""
    return load_inline("gpt1_gemm_calls", cpp_sources=_SOURCE, functions=["compare"], extra_cflags=["-O2"])


def compare(ext, m: int, n: int, k: int, dtype: torch.dtype, iters: int) -> dict:
    """One tile shape in one dtype: µs per call of mm and brgemm, and how far apart their products are."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype)
    t_mm, t_br, diff, vnni = ext.compare(a, b, iters)
    return dict(
        shape=(m, n, k),
        dtype=str(dtype).removeprefix("torch."),
        mm_us=t_mm,
        brgemm_us=t_br,
        diff=diff,
        form="VNNI (AMX)" if vnni else ("plain GEMM fallback" if dtype == torch.bfloat16 else "float"),
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=2000, help="timed calls per shape (default 2000)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as inside the kernel's parallel region
    ext = build()
    print(f"# {cpu_model()}; native bf16: {cpu_bf16_isa() or 'none'}; torch {torch.__version__}; 1 thread")
    print(f"{'m x n x k':>14} {'dtype':>8} {'mm us':>8} {'brgemm us':>10} {'mm/brgemm':>10}  brgemm form")
    for dtype in (torch.float32, torch.bfloat16):
        for m, n, k in TILES:
            r = compare(ext, m, n, k, dtype, args.iters)
            print(
                f"{f'{m} x {n} x {k}':>14} {r['dtype']:>8} {r['mm_us']:8.1f} {r['brgemm_us']:10.1f} "
                f"{r['mm_us'] / r['brgemm_us']:9.2f}x  {r['form']}"
            )


if __name__ == "__main__":
    main()
