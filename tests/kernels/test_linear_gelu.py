"""kernels/linear_gelu.py against engine.reference.linear_gelu (Triton interpreter on CPU).

Both forward implementations ("triton" matmul with a GELU epilogue, "cublas" addmm + Triton
GELU) are checked, each followed by the shared backward.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import reference
from helpers import assert_close, assert_fa_rule
from kernels import linear_gelu as kernel
from kernels.linear_gelu import CANDIDATES, linear_gelu_bwd, linear_gelu_fwd

ROOT = Path(__file__).resolve().parents[2]
GRAD_NAMES = ("grad_x", "grad_weight", "grad_bias")


def make_inputs(N: int, C: int, F: int, dtype: torch.dtype, seed: int = 0):
    """x, weight, bias and the one upstream gradient dy; pre spans GELU's curved range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(dtype)
    w = (torch.randn(F, C, generator=g) / C**0.5 * 2.0).to(dtype)  # pre ~ N(0, 4)
    b = (0.5 * torch.randn(F, generator=g)).to(dtype)
    dy = torch.randn(N, F, generator=g).to(dtype)
    return x, w, b, dy


def run_reference(x, w, b, dy, approximate, upcast=False):
    """y and (dx, dw, db) of the reference, by autograd, in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = reference.linear_gelu(*leaves, approximate, upcast=upcast)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def run_exact_reference(x, w, b, dy, approximate):
    """The reference in float64, results in float32: what an fp32 kernel should give."""
    y, grads = run_reference(*(t.double() for t in (x, w, b, dy)), approximate)
    return y.float(), [g.float() for g in grads]


def run_kernel(impl, x, w, b, dy, approximate):
    y, pre = CANDIDATES[impl](x, w, b, approximate)
    return y, pre, list(linear_gelu_bwd(dy, x, w, pre, approximate))


SHAPES = [(1, 48, 192), (37, 96, 384), (13, 100, 37), (70, 48, 192)]  # (N, C, F): 1, primes, not 2^k, F=4C


@pytest.mark.parametrize("impl", ["triton", "cublas"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("N,C,F", SHAPES)
def test_fp32_forward_and_grads(impl, approximate, N, C, F):
    x, w, b, dy = make_inputs(N, C, F, torch.float32)
    y, pre, grads = run_kernel(impl, x, w, b, dy, approximate)
    y_ref, grads_ref = run_exact_reference(x, w, b, dy, approximate)
    assert_close(pre, (x.double() @ w.double().t() + b.double()).float(), "pre")
    assert_close(y, y_ref, "y")
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        assert_close(got, want, name)


@pytest.mark.parametrize("impl", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("N,C,F", [(37, 96, 384), (5, 48, 37)])
def test_low_precision_fa_rule(impl, dtype, approximate, N, C, F):
    x, w, b, dy = make_inputs(N, C, F, dtype)
    y, _, grads = run_kernel(impl, x, w, b, dy, approximate)
    y_ref, grads_ref = run_reference(*(t.float() for t in (x, w, b, dy)), approximate, upcast=True)
    y_low, grads_low = run_reference(x, w, b, dy, approximate)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_fa_rule(y, y_ref, y_low, "y")
    for name, got, want, low in zip(GRAD_NAMES, grads, grads_ref, grads_low):
        assert_fa_rule(got, want, low, name)


def test_fp32_bias_with_low_precision_inputs():
    x, w, b, dy = make_inputs(9, 48, 192, torch.bfloat16)
    for impl in CANDIDATES:
        y, _ = CANDIDATES[impl](x, w, b.float(), "tanh")
        y_same, _ = CANDIDATES[impl](x, w, b, "tanh")  # b is exactly representable in bf16
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, y_same), impl


def test_grad_bias_deterministic_across_groups(monkeypatch):
    monkeypatch.setattr(kernel, "_MAX_GROUPS", 3)  # 5 row tiles of 32 → 3 groups, the last partial
    x, w, b, dy = make_inputs(150, 48, 192, torch.float32)
    _, pre = CANDIDATES["cublas"](x, w, b, "tanh")
    first = linear_gelu_bwd(dy, x, w, pre, "tanh")
    again = linear_gelu_bwd(dy, x, w, pre, "tanh")
    for got, same in zip(first, again):
        assert torch.equal(got, same), "two identical backward runs differ"
    _, grads_ref = run_exact_reference(x, w, b, dy, "tanh")
    for name, got, want in zip(GRAD_NAMES, first, grads_ref):
        assert_close(got, want, name)


def test_default_impl_dispatch(monkeypatch):
    x, w, b, _ = make_inputs(7, 48, 37, torch.float32)
    for impl in CANDIDATES:
        monkeypatch.setattr(kernel, "DEFAULT_IMPL", impl)
        y, pre = linear_gelu_fwd(x, w, b, "tanh")
        want_y, want_pre = CANDIDATES[impl](x, w, b, "tanh")
        assert torch.equal(y, want_y) and torch.equal(pre, want_pre)
    monkeypatch.setattr(kernel, "DEFAULT_IMPL", "cutlass")
    with pytest.raises(ValueError, match="DEFAULT_IMPL must be one of"):
        linear_gelu_fwd(x, w, b, "tanh")


_X, _W, _B, _DY = make_inputs(4, 8, 12, torch.float32)
BAD_FORWARD = {  # case → (arguments, expected message)
    "1-D x": ((_X[0], _W, _B, "tanh"), "x must be 2-D (N, C ≥ 1)"),
    "integer x": ((_X.long(), _W.long(), _B, "tanh"), "got torch.int64"),
    "weight width": ((_X, _W[:, :7], _B, "tanh"), "weight must be (F, 8) torch.float32"),
    "weight dtype": ((_X, _W.double(), _B, "tanh"), "got torch.float64 of shape (12, 8)"),
    "bias shape": ((_X, _W, _B[:5], "tanh"), "bias must be (12,) of dtype torch.float32"),
    "approximate": ((_X, _W, _B, "sigmoid"), "approximate must be 'tanh' or 'none', got 'sigmoid'"),
}


@pytest.mark.parametrize("impl", ["triton", "cublas"])
@pytest.mark.parametrize("case", BAD_FORWARD)
def test_bad_forward_inputs_raise(impl, case):
    args, message = BAD_FORWARD[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        CANDIDATES[impl](*args)


def test_bad_backward_inputs_raise():
    _, pre = CANDIDATES["cublas"](_X, _W, _B, "tanh")
    with pytest.raises(ValueError, match=re.escape("grad_y must be (4, 12) torch.float32")):
        linear_gelu_bwd(_DY[:, :5], _X, _W, pre, "tanh")
    with pytest.raises(ValueError, match=re.escape("pre must be (4, 12) torch.float32")):
        linear_gelu_bwd(_DY, _X, _W, pre.double(), "tanh")


_THROUGH_OPS = r"""
import sys, torch
import kernels.linear_gelu
from engine import ops
x, w, b, dy = torch.load(sys.argv[1])
out = {}
for impl in ("triton", "cublas"):
    kernels.linear_gelu.DEFAULT_IMPL = impl
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = ops.linear_gelu(leaves[0].view(2, 3, -1), *leaves[1:], "tanh")  # (B, T, C) input
    y.reshape(6, -1).backward(dy)
    out[impl] = (y.detach().reshape(6, -1), [t.grad for t in leaves])
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    torch.library.opcheck(torch.ops.gpt1.linear_gelu_fwd.default, (*args, "tanh"))
torch.save(out, sys.argv[2])
"""


def test_through_engine_ops_with_triton_cpu_kernels(tmp_path):
    """engine.ops.linear_gelu (registration, fake kernel, autograd) served by these launchers."""
    x, w, b, dy = make_inputs(6, 48, 192, torch.float32)
    torch.save((x, w, b, dy), tmp_path / "in.pt")
    env = dict(os.environ, GPT1_CPU_KERNELS="triton", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _THROUGH_OPS, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    y_ref, grads_ref = run_exact_reference(x, w, b, dy, "tanh")
    for impl, (y, grads) in torch.load(tmp_path / "out.pt").items():
        assert_close(y, y_ref, f"y ({impl})")
        for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
            assert_close(got, want, f"{name} ({impl})")
