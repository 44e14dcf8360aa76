"""Tolerances, in one place, each with its reason; and the comparisons that use them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# fp32 kernels against the fp32 reference differ only in accumulation order. Error is
# measured relative to the tensor's scale: |a - e| <= FP32_TOL * max(1, max|e|).
FP32_TOL = 1e-5

# float64 kernels (C++ gradcheck shapes) against the float64 reference: same reasoning.
FP64_TOL = 1e-10

# Low precision (bf16/fp16), the FlashAttention rule: against the fp32 reference, the
# kernel's error may be at most FA_SLACK x the error of PyTorch's own computation in that
# dtype. FA_FLOOR absorbs the case where PyTorch's error is exactly 0 (e.g. T = 1 attention,
# where the output is V itself): one unit in the last place of the dtype at the tensor's scale.
FA_SLACK = 2.0
FA_FLOOR = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| in float64, on the CPU (a CUDA result against a CPU reference)."""
    return (
        (actual.detach().cpu().double() - expected.detach().cpu().double()).abs().max().item()
        if actual.numel()
        else 0.0
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor") -> None:
    """fp32 / fp64 comparison at the tolerance of the dtype (see FP32_TOL / FP64_TOL)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    tol = FP64_TOL if expected.dtype == torch.float64 else FP32_TOL
    scale = max(1.0, expected.double().abs().max().item()) if expected.numel() else 1.0
    err = max_err(actual, expected)
    assert err <= tol * scale, f"{name}: max abs error {err:.3e} > {tol:.0e} x scale {scale:.3g}"


def assert_fa_rule(
    actual: torch.Tensor,
    ref_fp32: torch.Tensor,
    pytorch_lowp: torch.Tensor,
    name: str = "tensor",
    computed_in: torch.dtype | None = None,
) -> None:
    """FlashAttention rule: err(actual, ref) <= FA_SLACK * err(pytorch_lowp, ref) (+ floor).
    `computed_in`: the low precision behind an fp32 `actual` (e.g. weights trained under bf16
    autocast), which sets the floor; by default actual's own dtype."""
    assert actual.shape == ref_fp32.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref_fp32.shape)}"
    assert torch.isfinite(actual.float()).all(), f"{name}: non-finite values"
    err = max_err(actual, ref_fp32)
    base = max_err(pytorch_lowp, ref_fp32)
    dtype = computed_in or actual.dtype
    floor = FA_FLOOR.get(dtype, 0.0) * ref_fp32.double().abs().max().item() if ref_fp32.numel() else 0.0
    assert err <= FA_SLACK * base + floor, (
        f"{name}: error {err:.3e} > {FA_SLACK} x PyTorch's {dtype} error {base:.3e} (+ floor {floor:.1e})"
    )


# ---- references by autograd: one upstream gradient for the output and every input's grad ----


def autograd_reference(fn, tensors, dout, *args, **kwargs):
    """out = fn(*tensors, *args, **kwargs) and the grad of every tensor for upstream `dout`
    (None: out is a scalar loss), by autograd on the CPU, in the tensors' dtype."""
    leaves = [t.detach().cpu().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, *args, **kwargs)
    out.backward(None if dout is None else dout.detach().cpu().to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def exact_reference(fn, tensors, dout, *args, **kwargs):
    """The reference in float64, results in float32: what an fp32 kernel should give (PyTorch's
    own fp32 ops have errors of their own, e.g. LayerNorm's backward where the answer is 0)."""
    out, grads = autograd_reference(
        fn, [t.double() for t in tensors], None if dout is None else dout.double(), *args, **kwargs
    )
    return out.float(), [g.float() for g in grads]


# ---- the attention reference, as the op tests compare against it ----


def attention_reference(qkv, dout, H, p=0.0, mask=None, upcast=False):
    """out and grad_qkv of engine.model.reference.causal_attention, by autograd, in qkv's dtype."""
    from engine.model import reference

    mask = None if mask is None else mask.cpu()
    out, (grad,) = autograd_reference(reference.causal_attention, [qkv], dout, H, p, upcast=upcast, dropout_mask=mask)
    return out, grad


def attention_exact_reference(qkv, dout, H, p=0.0, mask=None):
    """The reference in float64, results in float32: what an fp32 kernel should give."""
    out, grad = attention_reference(qkv.double(), dout.double(), H, p, mask)
    return out.float(), grad.float()


def attention_reference_lse(qkv, H):
    """logsumexp over keys of the causally masked, scaled scores, in float64: (B, H, T) float32."""
    import math

    B, T, C3 = qkv.shape
    D = C3 // 3 // H
    q, k, _ = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.detach().cpu().double().split(H * D, dim=2))
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.logsumexp(s, dim=-1).float()


# ---- the CUDA build without a GPU ----------------------------------------------------------


def compile_for_sm90(script: str) -> str:
    """Runs `script` (which calls triton.compile for an sm_90 GPUTarget) in a fresh interpreter
    without TRITON_INTERPRET, from the repository root; returns its stdout. Skips the calling
    test when Triton's bundled ptxas (needed for the cubin) is missing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"no bundled ptxas at {ptxas}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


# GPT-1's original BPE files (MIT, OpenAI's release), kept beside the project for tests only.
GPT1_BPE = Path(__file__).resolve().parents[2] / "shared" / "gpt1-bpe"
GPT1_ENCODER, GPT1_MERGES = GPT1_BPE / "encoder_bpe_40000.json", GPT1_BPE / "vocab_40000.bpe"
needs_gpt1_files = pytest.mark.skipif(
    not GPT1_ENCODER.is_file(), reason="GPT-1's BPE files are not in ../shared/gpt1-bpe"
)
