"""The matmul limit of a training step on this machine: the rate torch's GEMMs reach at the step's own shapes.

A GPT1 training step is, in FLOPs, almost all GEMMs. Per layer, with N = B·T tokens: c_attn (N×C by C×3C),
attn.c_proj (N×C by C×C), mlp.c_fc (N×C by C×4C), mlp.c_proj (N×4C by 4C×C), each as a forward and two backward
GEMMs (dX = dY·W, dW = dYᵀ·X); the tied LM head (N×C by C×V) likewise; and attention's per-(batch, head) QKᵀ, P·V
and their four backward products, batched. Each shape is timed alone (median of a few runs) in the given dtype; the
rate is the sum of their FLOPs over the sum of their times — what a step that spent all its time in ATen GEMMs of
its own shapes would reach (attention's GEMMs are counted whole here, as they run; engine.training.flops halves
them for the causal mask, so a fused kernel that skips masked tiles can exceed 100% on that part).
A provider's step FLOP/s (engine.training.flops, the same formula as MFU) over its dtype's rate is its fraction
of that limit; bench/conftest.py prints it for each training-step provider.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from engine.model.config import GPT1Config


@dataclass(frozen=True)
class Gemm:
    """`count` calls of an (m×k by k×n) GEMM, each batched over `batch` (torch.bmm) when batch > 1."""

    name: str
    m: int
    n: int
    k: int
    count: int = 1
    batch: int = 1

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.batch * self.count


def step_gemms(cfg: GPT1Config, batch: int, seq_len: int) -> list[Gemm]:
    """The GEMMs of one training step (forward + backward) of `cfg` at batch × seq_len tokens."""
    N, C, T, V = batch * seq_len, cfg.n_embd, seq_len, cfg.vocab_size
    D, BH = C // cfg.n_head, batch * cfg.n_head
    gemms = []
    for name, fan_in, fan_out in (
        ("c_attn", C, 3 * C),
        ("attn.c_proj", C, C),
        ("c_fc", C, 4 * C),
        ("mlp.c_proj", 4 * C, C),
    ):
        gemms += [
            Gemm(f"{name} fwd", N, fan_out, fan_in, cfg.n_layer),
            Gemm(f"{name} dX", N, fan_in, fan_out, cfg.n_layer),
            Gemm(f"{name} dW", fan_out, fan_in, N, cfg.n_layer),
        ]
    gemms += [Gemm("lm_head fwd", N, V, C), Gemm("lm_head dX", N, C, V), Gemm("lm_head dW", V, C, N)]
    # attention, batched over (batch, head): S = QKᵀ and O = PV forward; dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q
    for name, m, n, k in (
        ("QK^T", T, T, D),
        ("PV", T, D, T),
        ("dO V^T", T, T, D),
        ("P^T dO", T, D, T),
        ("dS K", T, D, T),
        ("dS^T Q", T, D, T),
    ):
        gemms.append(Gemm(f"attention {name}", m, n, k, cfg.n_layer, batch=BH))
    return gemms


def _time_gemm(g: Gemm, dtype: torch.dtype, repeats: int) -> float:
    """Seconds of g's `count` calls: the median of `repeats` timed calls, times count."""
    shape = (g.batch,) if g.batch > 1 else ()
    a, b = torch.randn(*shape, g.m, g.k, dtype=dtype), torch.randn(*shape, g.k, g.n, dtype=dtype)
    mm = torch.bmm if g.batch > 1 else torch.mm
    mm(a, b)  # warm-up: oneDNN primitive creation, page faults
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * g.count


def gemm_rate(gemms: list[Gemm], dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of `gemms` in `dtype`: their summed FLOPs over their summed median times."""
    return sum(g.flops for g in gemms) / sum(_time_gemm(g, dtype, repeats) for g in gemms)
