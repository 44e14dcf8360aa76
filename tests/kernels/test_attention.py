"""kernels/attention.py against engine.reference.causal_attention (Triton interpreter on CPU)."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_close, assert_fa_rule
from helpers import attention_exact_reference as run_exact_reference
from helpers import attention_reference as run_reference
from helpers import attention_reference_lse as reference_lse
from philox_ref import keep_mask
from kernels import attention as kernel
from kernels.attention import attention_bwd, attention_dropout_mask, attention_fwd

ROOT = Path(__file__).resolve().parents[2]
# triton 3.6's interpreter int()s 1-element arrays for loop bounds (numpy < 2.4 only warns)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def make_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, seed: int = 0):
    """qkv (B, T, 3HD) and the one upstream gradient dout (B, T, HD) shared by all comparisons."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3 * H * D, generator=g)
    qkv[..., : H * D] *= 2.0  # peakier softmax than unit scores give
    dout = torch.randn(B, T, H * D, generator=g)
    return qkv.to(dtype), dout.to(dtype)


def make_seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


def run_kernel(qkv, dout, H, p=0.0, seed=None):
    out, lse = attention_fwd(qkv, H, p, seed)
    return out, lse, attention_bwd(dout, qkv, out, lse, H, p, seed)


# ---- exactness at fp32 ------------------------------------------------------------------

SHAPES = [  # (B, T, H, D): T = 1, primes and non powers of two, one and several tiles
    (1, 1, 2, 16),
    (2, 7, 1, 16),
    (1, 33, 2, 16),
    (2, 64, 1, 64),
    (1, 33, 1, 64),
    (1, 19, 1, 32),
    (1, 20, 1, 128),
]


@pytest.mark.parametrize("B,T,H,D", SHAPES)
def test_fp32_matches_reference(B, T, H, D):
    qkv, dout = make_inputs(B, T, H, D, torch.float32)
    out, lse, grad = run_kernel(qkv, dout, H)
    out_ref, grad_ref = run_exact_reference(qkv, dout, H)
    assert out.shape == (B, T, H * D) and out.is_contiguous()
    assert lse.shape == (B, H, T) and lse.dtype == torch.float32
    assert_close(out, out_ref, "out")
    assert_close(lse, reference_lse(qkv, H), "lse")
    assert_close(grad, grad_ref, "grad_qkv")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,H,D,p", [(2, 33, 2, 16, 0.0), (1, 64, 1, 64, 0.0), (1, 40, 2, 32, 0.2)])
def test_low_precision_fa_rule(dtype, B, T, H, D, p):
    qkv, dout = make_inputs(B, T, H, D, dtype)
    seed = make_seed(7) if p else None
    mask = attention_dropout_mask(seed, B, H, T, p) if p else None
    out, lse, grad = run_kernel(qkv, dout, H, p, seed)
    assert out.dtype == dtype and grad.dtype == dtype and lse.dtype == torch.float32
    out_ref, grad_ref = run_reference(qkv.float(), dout.float(), H, p, mask, upcast=True)
    out_low, grad_low = run_reference(qkv, dout, H, p, mask)
    assert_fa_rule(out, out_ref, out_low, "out")
    assert_fa_rule(grad, grad_ref, grad_low, "grad_qkv")


# ---- dropout ----------------------------------------------------------------------------


@pytest.mark.parametrize("B,T,H,D,p", [(2, 33, 2, 16, 0.2), (1, 64, 1, 64, 0.5), (1, 7, 1, 16, 0.9)])
def test_dropout_uses_one_mask_in_forward_and_backward(B, T, H, D, p):
    """out and every gradient equal the reference fed the kernels' own mask: the forward and both
    backward passes draw the same keep-mask, and scale survivors by 1/(1-p)."""
    qkv, dout = make_inputs(B, T, H, D, torch.float32)
    seed = make_seed(2**40 + 12345)  # above 2³²: the key's high word matters
    mask = attention_dropout_mask(seed, B, H, T, p)
    out, lse, grad = run_kernel(qkv, dout, H, p, seed)
    out_ref, grad_ref = run_exact_reference(qkv, dout, H, p, mask)
    assert_close(out, out_ref, "out")
    assert_close(lse, reference_lse(qkv, H), "lse (before dropout)")
    assert_close(grad, grad_ref, "grad_qkv")


def test_dropout_is_reproducible_and_seeded():
    B, T, H, D, p = 1, 24, 2, 16, 0.3
    qkv, dout = make_inputs(B, T, H, D, torch.float32)
    out_a, _, grad_a = run_kernel(qkv, dout, H, p, make_seed(1))
    out_b, _, grad_b = run_kernel(qkv, dout, H, p, make_seed(1))
    assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b), "same seed must give bit-identical results"
    out_c, _, _ = run_kernel(qkv, dout, H, p, make_seed(2))
    assert not torch.equal(out_a, out_c), "a different seed must give a different output"
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    mask_1 = attention_dropout_mask(make_seed(1), B, H, T, p)[..., tril]
    mask_2 = attention_dropout_mask(make_seed(2), B, H, T, p)[..., tril]
    assert not torch.equal(mask_1, mask_2), "a different seed must give a different mask"
    assert not torch.equal(mask_1[:, 0], mask_1[:, 1]), "heads must draw different masks"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(p):
    """Over the n = B·H·T(T+1)/2 causal entries the kept fraction is within 5σ of 1 - p,
    σ = √(p(1-p)/n) (the 16-bit threshold moves the rate by < 2⁻¹⁷, far inside that)."""
    B, H, T = 2, 4, 128
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    keep = attention_dropout_mask(make_seed(123), B, H, T, p)
    assert keep.dtype == torch.bool and keep.shape == (B, H, T, T)
    kept = keep[..., tril].double()
    n = kept.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept.mean().item() - (1 - p)) <= 5 * sigma, f"keep rate {kept.mean().item():.4f} vs {1 - p}"
    per_row = keep[..., tril].view(B * H, -1).double().mean(dim=1)  # and no head is degenerate
    assert (per_row - (1 - p)).abs().max().item() <= 5 * math.sqrt(p * (1 - p) / (n / (B * H)))


def test_dropout_mask_without_dropout_keeps_everything():
    assert attention_dropout_mask(make_seed(5), 1, 2, 9, 0.0).all()


@pytest.mark.parametrize("blocks", [kernel._MASK_BLOCKS, (16, 32), (16, 8)])
def test_dropout_mask_is_the_documented_philox_draw(blocks):
    """keep(b, h, i, j) = [16-bit half (j%8)%2 of word (j%8)//2 of Philox4x32-7(seed,
    (i, j//8, b·H + h, 0)) ≥ round(p·2¹⁶)], whatever tiles compute it."""
    B, H, T, p, seed = 2, 3, 21, 0.35, 2**61 + 987654321
    keep = kernel._dropout_mask(make_seed(seed), B, H, T, p, blocks).numpy()
    bh, i, j = np.meshgrid(np.arange(B * H), np.arange(T), np.arange(T), indexing="ij")
    expected = keep_mask(seed, p, i, j, stream=bh).reshape(B, H, T, T)
    assert np.array_equal(keep, expected)


# ---- validation -------------------------------------------------------------------------

QKV = torch.zeros(1, 4, 96)  # H = 2 → D = 16
OUT, LSE = torch.zeros(1, 4, 32), torch.zeros(1, 2, 4)
BAD_INPUTS = [
    ("rank", lambda: attention_fwd(torch.zeros(4, 96), 2, 0.0, None), r"\(B, T, 3C\)"),
    ("3C", lambda: attention_fwd(torch.zeros(1, 4, 95), 2, 0.0, None), r"3C.*95"),
    ("head_dim", lambda: attention_fwd(torch.zeros(1, 4, 72), 1, 0.0, None), r"head_dim.*24"),
    ("n_head", lambda: attention_fwd(QKV, 0, 0.0, None), r"n_head.*0"),
    ("dtype", lambda: attention_fwd(QKV.double(), 2, 0.0, None), r"dtype.*float64"),
    ("contiguous", lambda: attention_fwd(torch.zeros(1, 96, 4).transpose(1, 2), 2, 0.0, None), r"contiguous"),
    ("p range", lambda: attention_fwd(QKV, 2, 1.0, make_seed(0)), r"dropout_p.*1\.0"),
    ("no seed", lambda: attention_fwd(QKV, 2, 0.1, None), r"seed.*None"),
    ("seed dtype", lambda: attention_fwd(QKV, 2, 0.1, torch.tensor([1], dtype=torch.int32)), r"int64.*int32"),
    ("seed shape", lambda: attention_fwd(QKV, 2, 0.1, torch.tensor([1, 2])), r"one element.*\(2,\)"),
    ("seed device", lambda: attention_fwd(QKV, 2, 0.1, make_seed(1).to("meta")), r"seed is on meta"),
    ("grad shape", lambda: attention_bwd(torch.zeros(1, 4, 16), QKV, OUT, LSE, 2, 0.0, None), r"grad_out.*\(1, 4, 32\)"),
    ("grad dtype", lambda: attention_bwd(OUT.half(), QKV, OUT, LSE, 2, 0.0, None), r"grad_out.*torch.float16"),
    ("lse", lambda: attention_bwd(OUT, QKV, OUT, LSE.half(), 2, 0.0, None), r"lse.*float32"),
    ("mask p", lambda: attention_dropout_mask(make_seed(0), 1, 1, 4, -0.5), r"dropout_p.*-0\.5"),
    ("mask seq_len", lambda: attention_dropout_mask(make_seed(0), 1, 1, -3, 0.1), r"seq_len.*-3"),
]


@pytest.mark.parametrize("what,call,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_value_error(what, call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- the registered op, served by these launchers on CPU ----------------------------------

_THROUGH_OPS = r"""
import torch
from engine import ops, reference

ops.load_cpu_kernels()  # GPT1_CPU_KERNELS=triton: the Triton launchers serve the CPU
B, T, H, D, p = 2, 11, 2, 16, 0.25
g = torch.Generator().manual_seed(0)
qkv = torch.randn(B, T, 3 * H * D, generator=g, requires_grad=True)
dout = torch.randn(B, T, H * D, generator=g)
errors = {}
for dropout_p in (0.0, p):
    torch.manual_seed(1)
    out = ops.causal_attention(qkv, H, dropout_p)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    torch.manual_seed(1)  # the same seed engine.ops drew, and the mask it means
    seed = ops.new_seed(qkv, dropout_p)
    mask = torch.ops.gpt1.attention_dropout_mask(seed, B, H, T, dropout_p) if dropout_p else None
    leaf = qkv.detach().double().requires_grad_()
    ref = reference.causal_attention(leaf, H, dropout_p, dropout_mask=mask)
    ref.backward(dout.double())
    errors[dropout_p] = max((out - ref).abs().max().item(), (grad - leaf.grad).abs().max().item())
torch.library.opcheck(torch.ops.gpt1.attention_fwd, (qkv, H, 0.0, None))
torch.library.opcheck(torch.ops.gpt1.attention_fwd, (qkv, H, p, torch.tensor([42], dtype=torch.int64)))
print("max_err", max(errors.values()))
"""


def test_registered_op_runs_the_triton_launchers_on_cpu():
    """engine.ops with GPT1_CPU_KERNELS=triton: forward, autograd (register_autograd → attention_bwd),
    the dropout seed path, and torch.library.opcheck (schema, fake kernel, AOT dispatch)."""
    env = {**os.environ, "GPT1_CPU_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _THROUGH_OPS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    match = re.search(r"max_err (\S+)", proc.stdout)
    assert match, proc.stdout[-2000:]
    assert float(match.group(1)) <= 1e-5, f"registered op differs from the reference by {match.group(1)}"
