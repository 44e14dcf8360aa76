"""kernels/add_layernorm.py against engine.reference.add_layernorm (Triton interpreter on CPU)."""
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

from engine import reference
from helpers import assert_close, assert_fa_rule
from philox_ref import keep_mask
from kernels import add_layernorm as kernel
from kernels.add_layernorm import add_layernorm_bwd, add_layernorm_dropout_mask, add_layernorm_fwd

ROOT = Path(__file__).resolve().parents[2]
EPS = 1e-5
GRAD_NAMES = ("grad_x", "grad_residual", "grad_weight", "grad_bias")


def make_inputs(N: int, C: int, dtype: torch.dtype, param_dtype: torch.dtype, seed: int = 0):
    """x, residual, weight, bias, and the one upstream gradient dy shared by all comparisons."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(dtype)
    r = (2.0 * torch.randn(N, C, generator=g) + 0.5).to(dtype)  # different scale and offset
    w = (1.0 + 0.5 * torch.randn(C, generator=g)).to(param_dtype)
    b = (0.5 * torch.randn(C, generator=g)).to(param_dtype)
    dy = torch.randn(N, C, generator=g).to(dtype)
    return x, r, w, b, dy


def run_reference(x, r, w, b, dy, p, mask, upcast=False):
    """y and (dx, dr, dw, db) of the reference, by autograd, in the inputs' dtypes."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
    y = reference.add_layernorm(*leaves, EPS, p, upcast=upcast, dropout_mask=mask)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def run_exact_reference(x, r, w, b, dy, p, mask):
    """The reference evaluated in float64, results in float32: what an fp32 kernel should give.

    (PyTorch's own fp32 LayerNorm backward is off by ~rstd·ulp where the exact answer is 0, e.g.
    C = 1, so comparing against it would measure the reference's error, not the kernel's.)
    """
    y, grads = run_reference(*(t.double() for t in (x, r, w, b, dy)), p, mask)
    return y.float(), [g.float() for g in grads]


def run_kernel(x, r, w, b, dy, p, seed):
    """y, mean, rstd and (dx, dr, dw, db) of the Triton kernels; dr = dx when p == 0."""
    y, mean, rstd = add_layernorm_fwd(x, r, w, b, EPS, p, seed)
    dx, dr, dw, db = add_layernorm_bwd(dy, x, r, w, mean, rstd, p, seed)
    if p == 0:
        assert dr.numel() == 0, "grad_residual must be empty without dropout (engine.ops reuses grad_x)"
        dr = dx
    return y, mean, rstd, [dx, dr, dw, db]


def seed_tensor(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


SHAPES = [(1, 48), (37, 96), (17, 100), (5, 768), (3, 1)]


@pytest.mark.parametrize("N,C", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fp32_forward_and_grads(N, C, p):
    x, r, w, b, dy = make_inputs(N, C, torch.float32, torch.float32)
    seed = seed_tensor(1234) if p > 0 else None
    mask = add_layernorm_dropout_mask(seed, N, C, p) if p > 0 else None
    y, mean, rstd, grads = run_kernel(x, r, w, b, dy, p, seed)
    y_ref, grads_ref = run_exact_reference(x, r, w, b, dy, p, mask)
    assert_close(y, y_ref, "y")
    # the saved statistics, from s = x + dropout(r) in float64
    s = x.double() + (r.double() * mask / (1 - p) if p > 0 else r.double())
    assert_close(mean, s.mean(1).float(), "mean")
    assert_close(rstd, (s.var(1, unbiased=False) + EPS).rsqrt().float(), "rstd")
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        assert_close(got, want, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("param_dtype", ["same", torch.float32], ids=["params_same", "params_fp32"])
@pytest.mark.parametrize("N,C,p", [(37, 96, 0.0), (19, 768, 0.1)])
def test_low_precision_fa_rule(dtype, param_dtype, N, C, p):
    param_dtype = dtype if param_dtype == "same" else param_dtype
    x, r, w, b, dy = make_inputs(N, C, dtype, param_dtype)
    seed = seed_tensor(99) if p > 0 else None
    mask = add_layernorm_dropout_mask(seed, N, C, p) if p > 0 else None
    y, _, _, grads = run_kernel(x, r, w, b, dy, p, seed)
    y_ref, grads_ref = run_reference(*(t.float() for t in (x, r, w, b, dy)), p, mask, upcast=True)
    y_low, grads_low = run_reference(x, r, w, b, dy, p, mask)
    assert y.dtype == dtype and grads[2].dtype == param_dtype
    assert_fa_rule(y, y_ref, y_low, "y")
    for name, got, want, low in zip(GRAD_NAMES, grads, grads_ref, grads_low):
        if got.dtype == torch.float32:  # float32 gain/bias: both sides compute it in float32
            assert_close(got, want, name)
        else:
            assert_fa_rule(got, want, low, name)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_autocast_layout_fp32_stream_bf16_residual(p):
    """Under autocast the stream x stays float32 and the residual is a bf16 matmul output: y and
    grad_x are float32 (exact to fp32 tolerance), grad_residual comes back in bf16."""
    N, C = 23, 96
    x, r, w, b, dy = make_inputs(N, C, torch.float32, torch.float32)
    r = r.to(torch.bfloat16)
    seed = seed_tensor(7) if p > 0 else None
    mask = add_layernorm_dropout_mask(seed, N, C, p) if p > 0 else None
    y, _, _, grads = run_kernel(x, r, w, b, dy, p, seed)
    y_ref, grads_ref = run_exact_reference(x, r.float(), w, b, dy, p, mask)
    _, grads_pt = run_reference(x, r, w, b, dy, p, mask)  # PyTorch: fp32 math, grad cast to bf16
    assert y.dtype == torch.float32 and grads[0].dtype == torch.float32
    assert_close(y, y_ref, "y")
    for name, got, want, pt in zip(GRAD_NAMES, grads, grads_ref, grads_pt):
        if name == "grad_residual" and p > 0:
            assert got.dtype == torch.bfloat16
            assert_fa_rule(got, want, pt, name)
        else:
            assert_close(got.float(), want, name)


def test_dropout_same_seed_is_reproducible_and_seeds_differ():
    x, r, w, b, dy = make_inputs(23, 96, torch.float32, torch.float32)
    first = run_kernel(x, r, w, b, dy, 0.3, seed_tensor(7))
    again = run_kernel(x, r, w, b, dy, 0.3, seed_tensor(7))
    other = run_kernel(x, r, w, b, dy, 0.3, seed_tensor(8))
    assert torch.equal(first[0], again[0])
    for got, want in zip(first[3], again[3]):
        assert torch.equal(got, want)
    assert not torch.equal(first[0], other[0])
    mask7 = add_layernorm_dropout_mask(seed_tensor(7), 23, 96, 0.3)
    mask8 = add_layernorm_dropout_mask(seed_tensor(8), 23, 96, 0.3)
    assert (mask7 != mask8).float().mean() > 0.2  # independent masks differ in ~2p(1-p) = 42%
    # a seed beyond 32 bits changes the draw too (the high word keys Philox)
    assert not torch.equal(mask7, add_layernorm_dropout_mask(seed_tensor(7 + 2**40), 23, 96, 0.3))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(p):
    rows, cols = 256, 1000
    keep = add_layernorm_dropout_mask(seed_tensor(2024), rows, cols, p).double()
    n = rows * cols
    q = round(p * 2**16) / 2**16  # the realised drop rate: 16-bit draws against round(p·2¹⁶)
    sigma = math.sqrt(q * (1 - q) / n)
    # bound: 5 standard deviations of the binomial keep-rate (false alarm ~ 6e-7)
    assert abs(keep.mean().item() - (1 - q)) < 5 * sigma
    # no stripes: every column's rate within 6 sigma of its own 256-draw binomial (a column is one
    # 16-bit half of one Philox word: a bad half or word would show here)
    col_sigma = math.sqrt(q * (1 - q) / rows)
    assert (keep.mean(0) - (1 - q)).abs().max().item() < 6 * col_sigma
    assert not torch.equal(keep[0], keep[1])  # rows are not copies of each other
    assert not torch.equal(keep[:, :8], keep[:, 8:16])  # nor column groups


def documented_mask(seed: int, rows: int, cols: int, p: float) -> np.ndarray:
    """The module docstring's formula: keep(i, j) = [16-bit half (j%8)%2 of word (j%8)//2 of
    Philox4x32-7(seed, (i, j//8, 0, 0)) ≥ round(p·2¹⁶)]."""
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return keep_mask(seed, p, i, j, stream=np.zeros_like(i))


@pytest.mark.parametrize("tile", [kernel._TILE, 8])  # 8: one row per program
@pytest.mark.parametrize("rows,cols", [(70, 7), (3, 1), (5, 100), (2, 257), (9, 64)])
def test_dropout_mask_is_the_documented_philox_draw(monkeypatch, tile, rows, cols):
    """The mask is the docstring's formula, bit for bit, whatever the width (not a multiple of 8,
    below 8) and however many rows a program holds (ROWS = 64 for narrow rows: 70 crosses two)."""
    monkeypatch.setattr(kernel, "_TILE", tile)
    seed, p = 2**61 + 987654321, 0.35  # the seed's high word keys Philox too
    keep = add_layernorm_dropout_mask(seed_tensor(seed), rows, cols, p).numpy()
    assert np.array_equal(keep, documented_mask(seed, rows, cols, p))


def test_dropout_refuses_shapes_whose_counters_would_collide():
    """Counters hold i and j // 8 in 32 bits each: more than 2³² rows or 2³⁵ columns are refused
    (checked on the sizes, so no such tensor is needed)."""
    seed, p = 31337, 0.5
    with pytest.raises(ValueError, match=re.escape("rows <= 2**32 and columns <= 2**35")):
        add_layernorm_dropout_mask(seed_tensor(seed), 2**32 + 1, 0, p)
    with pytest.raises(ValueError, match=re.escape("got 0 rows of 34359738369")):
        add_layernorm_dropout_mask(seed_tensor(seed), 0, 2**35 + 1, p)
    # at the limits, and beyond them without dropout, nothing is drawn and nothing refused
    assert add_layernorm_dropout_mask(seed_tensor(seed), 2**32, 0, p).shape == (2**32, 0)
    assert add_layernorm_dropout_mask(seed_tensor(seed), 0, 2**35 + 1, 0.0).shape == (0, 2**35 + 1)


def test_dropout_mask_without_dropout_keeps_everything():
    assert add_layernorm_dropout_mask(seed_tensor(1), 3, 5, 0.0).all()


def test_grad_weight_deterministic_across_groups(monkeypatch):
    # few groups, so every program loops over several row tiles and the last group is partial
    monkeypatch.setattr(kernel, "_MAX_GROUPS", 3)
    N, C = 301, 48  # backward: one row per tile, so 301 tiles in 3 groups of 101 (the last partial)
    x, r, w, b, dy = make_inputs(N, C, torch.float32, torch.float32)
    seed = seed_tensor(5)
    _, _, _, grads = run_kernel(x, r, w, b, dy, 0.2, seed)
    _, _, _, grads_again = run_kernel(x, r, w, b, dy, 0.2, seed)
    for got, again in zip(grads, grads_again):
        assert torch.equal(got, again), "two identical backward runs differ"
    _, grads_ref = run_exact_reference(x, r, w, b, dy, 0.2, add_layernorm_dropout_mask(seed, N, C, 0.2))
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        assert_close(got, want, name)


_X, _R, _W, _B, _ = make_inputs(4, 8, torch.float32, torch.float32)
_S = seed_tensor(1)
BAD_FORWARD = {  # case → (arguments, expected message)
    "1-D x": ((_X[0], _R[0], _W, _B, EPS, 0.0, None), "x must be 2-D"),
    "integer x": ((_X.long(), _R.long(), _W, _B, EPS, 0.0, None), "x must be 2-D (N, C ≥ 1) float32"),
    "residual shape": ((_X, _R[:3], _W, _B, EPS, 0.0, None), "residual must be float32/float16/bfloat16 of shape (4, 8)"),
    "residual dtype": ((_X, _R.double(), _W, _B, EPS, 0.0, None), "got torch.float64"),
    "weight shape": ((_X, _R, _W[:7], _B, EPS, 0.0, None), "weight must be (8,)"),
    "bias dtype": ((_X, _R, _W, _B.double(), EPS, 0.0, None), "bias must be (8,) of dtype torch.float32"),
    "negative eps": ((_X, _R, _W, _B, -1.0, 0.0, None), "eps must be a finite number >= 0, got -1.0"),
    "dropout_p = 1": ((_X, _R, _W, _B, EPS, 1.0, _S), "dropout_p must be in [0, 1), got 1.0"),
    "missing seed": ((_X, _R, _W, _B, EPS, 0.5, None), "dropout_p=0.5 needs a seed tensor"),
    "int32 seed": ((_X, _R, _W, _B, EPS, 0.5, _S.int()), "seed must be an int64 tensor"),
}


@pytest.mark.parametrize("case", BAD_FORWARD)
def test_bad_forward_inputs_raise(case):
    args, message = BAD_FORWARD[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        add_layernorm_fwd(*args)


def test_bad_backward_inputs_raise():
    x, r, w, b, dy = make_inputs(4, 8, torch.float32, torch.float32)
    _, mean, rstd = add_layernorm_fwd(x, r, w, b, EPS, 0.0, None)
    with pytest.raises(ValueError, match="grad_y must be"):
        add_layernorm_bwd(dy[:2], x, r, w, mean, rstd, 0.0, None)
    with pytest.raises(ValueError, match="mean must be float32 of shape"):
        add_layernorm_bwd(dy, x, r, w, mean.double(), rstd, 0.0, None)
    with pytest.raises(ValueError, match="rows and cols must be >= 0"):
        add_layernorm_dropout_mask(seed_tensor(1), -1, 4, 0.5)


_THROUGH_OPS = r"""
import sys, torch
from engine import ops
x, r, w, b, dy = torch.load(sys.argv[1])
out = {}
for p in (0.0, 0.2):
    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    torch.manual_seed(3)
    seed = ops.new_seed(x, p)
    torch.manual_seed(3)  # the wrapper draws the same seed
    y = ops.add_layernorm(*leaves, 1e-5, p)
    y.backward(dy)
    mask = torch.ops.gpt1.add_layernorm_dropout_mask(seed, *x.shape, p) if p > 0 else None
    out[p] = (y.detach(), [t.grad for t in leaves], mask)
args = [t.clone().requires_grad_() for t in (x, r, w, b)]
torch.library.opcheck(torch.ops.gpt1.add_layernorm_fwd.default, (*args, 1e-5, 0.2, torch.tensor([11])))
torch.library.opcheck(torch.ops.gpt1.add_layernorm_fwd.default, (*args, 1e-5, 0.0, None))
torch.save(out, sys.argv[2])
"""


def test_through_engine_ops_with_triton_cpu_kernels(tmp_path):
    """engine.ops.add_layernorm (registration, fake kernel, autograd) served by these launchers."""
    x, r, w, b, dy = make_inputs(6, 48, torch.float32, torch.float32)
    torch.save((x, r, w, b, dy), tmp_path / "in.pt")
    env = dict(os.environ, GPT1_CPU_KERNELS="triton", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _THROUGH_OPS, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(tmp_path / "out.pt")
    for p, (y, grads, mask) in out.items():
        y_ref, grads_ref = run_exact_reference(x, r, w, b, dy, p, mask)
        assert_close(y, y_ref, f"y (p={p})")
        for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
            assert_close(got, want, f"{name} (p={p})")
