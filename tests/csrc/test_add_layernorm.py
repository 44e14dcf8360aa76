"""csrc/add_layernorm.cpp (gpt1::add_layernorm_* on CPU) against engine.reference.add_layernorm."""
from __future__ import annotations

import math
import re

import pytest
import torch

from engine import ops, reference
from helpers import assert_close, assert_fa_rule

EPS = 1e-5
GRAD_NAMES = ("grad_x", "grad_residual", "grad_weight", "grad_bias")
gpt1 = torch.ops.gpt1


def make_inputs(N, C, dtype=torch.float32, param_dtype=None, seed=0):
    """x, residual, weight, bias, and the one upstream gradient dy shared by every comparison."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(dtype)
    r = (2.0 * torch.randn(N, C, generator=g) + 0.5).to(dtype)  # another scale and offset
    w = (1.0 + 0.5 * torch.randn(C, generator=g)).to(param_dtype or dtype)
    b = (0.5 * torch.randn(C, generator=g)).to(param_dtype or dtype)
    dy = torch.randn(N, C, generator=g).to(dtype)
    return x, r, w, b, dy


def seed_tensor(value):
    return torch.tensor([value], dtype=torch.int64)


def run_fused(x, r, w, b, dy, p, seed):
    """y and (dx, dr, dw, db) through the registered op and its autograd (dr = dx when p = 0)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
    y, _, _ = gpt1.add_layernorm_fwd(*leaves, EPS, p, seed)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


def run_reference(x, r, w, b, dy, p, mask, upcast=False):
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
    y = reference.add_layernorm(*leaves, EPS, p, upcast=upcast, dropout_mask=mask)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def run_exact_reference(x, r, w, b, dy, p, mask):
    """The reference in float64, cast to float32: what an fp32 kernel should give (PyTorch's own
    fp32 LayerNorm backward has errors of its own, e.g. where the exact gradient is 0 at C = 1)."""
    y, grads = run_reference(*(t.double() for t in (x, r, w, b, dy)), p, mask)
    return y.float(), [g.float() for g in grads]


SHAPES = [(1, 1), (3, 1), (1, 7), (13, 96), (37, 257), (5, 768), (70, 100)]


@pytest.mark.parametrize("N,C", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fp32_forward_and_grads_match_reference(N, C, p):
    x, r, w, b, dy = make_inputs(N, C)
    seed = seed_tensor(1234) if p > 0 else None
    mask = gpt1.add_layernorm_dropout_mask(seed, N, C, p) if p > 0 else None
    y, grads = run_fused(x, r, w, b, dy, p, seed)
    y_ref, grads_ref = run_exact_reference(x, r, w, b, dy, p, mask)
    assert_close(y, y_ref, "y")
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        assert_close(got, want, name)
    _, mean, rstd = gpt1.add_layernorm_fwd(x, r, w, b, EPS, p, seed)
    s = x.double() + (r.double() * mask / (1 - p) if p > 0 else r.double())
    assert mean.dtype == rstd.dtype == torch.float32
    assert_close(mean, s.mean(1).float(), "mean")
    assert_close(rstd, (s.var(1, unbiased=False) + EPS).rsqrt().float(), "rstd")


def test_grad_residual_is_empty_without_dropout():
    x, r, w, b, dy = make_inputs(4, 8)
    _, mean, rstd = gpt1.add_layernorm_fwd(x, r, w, b, EPS, 0.0, None)
    dx, dr, _, _ = gpt1.add_layernorm_bwd(dy, x, r, w, mean, rstd, 0.0, None)
    assert dr.numel() == 0 and dx.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("param_dtype", ["same", torch.float32], ids=["params_same", "params_fp32"])
@pytest.mark.parametrize("N,C,p", [(37, 96, 0.0), (19, 768, 0.1)])
def test_low_precision_fa_rule(dtype, param_dtype, N, C, p):
    param_dtype = dtype if param_dtype == "same" else param_dtype
    x, r, w, b, dy = make_inputs(N, C, dtype, param_dtype)
    seed = seed_tensor(99) if p > 0 else None
    mask = gpt1.add_layernorm_dropout_mask(seed, N, C, p) if p > 0 else None
    y, grads = run_fused(x, r, w, b, dy, p, seed)
    y_ref, grads_ref = run_reference(*(t.float() for t in (x, r, w, b, dy)), p, mask, upcast=True)
    y_low, grads_low = run_reference(x, r, w, b, dy, p, mask)
    assert y.dtype == dtype and grads[2].dtype == param_dtype
    assert_fa_rule(y, y_ref, y_low, "y")
    for name, got, want, low in zip(GRAD_NAMES, grads, grads_ref, grads_low):
        if got.dtype == torch.float32:  # fp32 gain/bias: both sides reduce in fp32
            assert_close(got, want, name)
        else:
            assert_fa_rule(got, want, low, name)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_autocast_layout_fp32_stream_bf16_residual(p):
    """Under autocast the stream x stays float32 and the residual is a bf16 matmul output: y and
    grad_x are float32 (exact to fp32 tolerance), grad_residual comes back in bf16."""
    N, C = 23, 96
    x, r, w, b, dy = make_inputs(N, C)
    r = r.to(torch.bfloat16)
    seed = seed_tensor(7) if p > 0 else None
    mask = gpt1.add_layernorm_dropout_mask(seed, N, C, p) if p > 0 else None
    y, grads = run_fused(x, r, w, b, dy, p, seed)
    y_ref, grads_ref = run_exact_reference(x, r.float(), w, b, dy, p, mask)
    _, grads_pt = run_reference(x, r, w, b, dy, p, mask)  # PyTorch: fp32 math, grad cast to bf16
    assert y.dtype == torch.float32 and grads[0].dtype == torch.float32 and grads[1].dtype == torch.bfloat16
    assert_close(y, y_ref, "y")
    for name, got, want, pt in zip(GRAD_NAMES, grads, grads_ref, grads_pt):
        if name == "grad_residual":
            assert_fa_rule(got, want, pt, name)
        else:
            assert_close(got, want, name)


def test_gradcheck_float64_through_engine_ops():
    x, r, w, b, _ = make_inputs(3, 5, torch.float64)
    args = [t.requires_grad_() for t in (x, r, w, b)]
    assert torch.autograd.gradcheck(lambda *a: ops.add_layernorm(*a, EPS), args)


def test_gradcheck_float64_with_dropout():
    x, r, w, b, _ = make_inputs(4, 9, torch.float64)
    args = [t.requires_grad_() for t in (x, r, w, b)]
    seed = seed_tensor(42)  # fixed seed: the function gradcheck differentiates is deterministic
    assert torch.autograd.gradcheck(lambda *a: gpt1.add_layernorm_fwd(*a, EPS, 0.3, seed)[0], args)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck(p):
    x, r, w, b, dy = make_inputs(6, 10)
    seed = seed_tensor(3) if p > 0 else None
    args = [t.requires_grad_() for t in (x, r, w, b)]
    torch.library.opcheck(gpt1.add_layernorm_fwd.default, (*args, EPS, p, seed))
    _, mean, rstd = gpt1.add_layernorm_fwd(x, r, w, b, EPS, p, seed)
    torch.library.opcheck(gpt1.add_layernorm_bwd.default, (dy, x.detach(), r.detach(), w.detach(), mean, rstd, p, seed))
    torch.library.opcheck(gpt1.add_layernorm_dropout_mask.default, (seed_tensor(3), 6, 10, p))


def test_non_contiguous_inputs_give_the_contiguous_result():
    x, r, w, b, dy = make_inputs(12, 40)
    wide_x, wide_r = torch.cat([x, x], 1), torch.cat([r, r], 1)
    strided = gpt1.add_layernorm_fwd(wide_x[:, ::2], wide_r[:, ::2], torch.cat([w, w])[::2], b, EPS, 0.0, None)
    dense = gpt1.add_layernorm_fwd(wide_x[:, ::2].contiguous(), wide_r[:, ::2].contiguous(),
                                   torch.cat([w, w])[::2].contiguous(), b, EPS, 0.0, None)
    for got, want in zip(strided, dense):
        assert torch.equal(got, want)


def test_dropout_same_seed_is_bit_identical_and_seeds_differ():
    x, r, w, b, dy = make_inputs(23, 96)
    first = run_fused(x, r, w, b, dy, 0.3, seed_tensor(7))
    again = run_fused(x, r, w, b, dy, 0.3, seed_tensor(7))
    other = run_fused(x, r, w, b, dy, 0.3, seed_tensor(8))
    assert torch.equal(first[0], again[0])
    for got, want in zip(first[1], again[1]):
        assert torch.equal(got, want)
    assert not torch.equal(first[0], other[0])
    mask7 = gpt1.add_layernorm_dropout_mask(seed_tensor(7), 23, 96, 0.3)
    mask8 = gpt1.add_layernorm_dropout_mask(seed_tensor(8), 23, 96, 0.3)
    assert (mask7 != mask8).float().mean() > 0.2  # independent masks differ in ~2p(1-p) = 42%
    # the seed's high word is part of the key too
    assert not torch.equal(mask7, gpt1.add_layernorm_dropout_mask(seed_tensor(7 + 2**40), 23, 96, 0.3))


def test_dropout_through_engine_ops_follows_torch_manual_seed():
    x, r, w, b, _ = make_inputs(9, 32)
    torch.manual_seed(5)
    y1 = ops.add_layernorm(x, r, w, b, EPS, 0.4)
    torch.manual_seed(5)
    y2 = ops.add_layernorm(x, r, w, b, EPS, 0.4)
    y3 = ops.add_layernorm(x, r, w, b, EPS, 0.4)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    torch.manual_seed(5)
    mask = gpt1.add_layernorm_dropout_mask(ops.new_seed(x, 0.4), 9, 32, 0.4)
    assert_close(y1, reference.add_layernorm(x, r, w, b, EPS, 0.4, dropout_mask=mask), "y")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate_and_scaling(p):
    rows, cols = 256, 1000
    keep = gpt1.add_layernorm_dropout_mask(seed_tensor(2024), rows, cols, p).double()
    n = rows * cols
    q = round(p * 2**16) / 2**16  # the realised drop rate: 16-bit draws against round(p·2¹⁶)
    # bound: 5 standard deviations of the binomial keep-rate (false alarm ~ 6e-7)
    assert abs(keep.mean().item() - (1 - q)) < 5 * math.sqrt(q * (1 - q) / n)
    # no stripes: every column's rate within 6 sigma of its own 256-draw binomial (a column is one
    # 16-bit half of one Philox word)
    assert (keep.mean(0) - (1 - q)).abs().max().item() < 6 * math.sqrt(q * (1 - q) / rows)
    assert not torch.equal(keep[0], keep[1])
    assert not torch.equal(keep[:, :8], keep[:, 8:16])
    # scaling: with x = 0, weight = 1, bias = 0 and eps huge, y ≈ s / √eps, s = r·keep/(1 − p)
    r = torch.ones(rows, cols)
    y, _, _ = gpt1.add_layernorm_fwd(torch.zeros(rows, cols), r, torch.ones(cols), torch.zeros(cols), 1e12, p,
                                     seed_tensor(2024))
    expected = keep / (1 - p)
    assert_close(y * 1e6, (expected - expected.mean(1, keepdim=True)).float(), "scaled residual (minus mean)")


def test_dropout_mask_matches_the_triton_kernel():
    """Bit for bit the Triton kernel's mask (tests/kernels pins that one to a numpy rendering of the
    documented formula), over widths below 8, not multiples of 8, and row counts past a tile."""
    try:
        from kernels.add_layernorm import add_layernorm_dropout_mask as triton_mask
    except Exception as e:  # noqa: BLE001 — no triton here: nothing to compare against
        pytest.skip(f"Triton kernels unavailable: {e}")
    cases = [(123456789012345, 7, 33, 0.3), (2**62 - 1, 5, 100, 0.1), (5, 70, 7, 0.5), (2**40 + 9, 3, 1, 0.2),
             (77, 2, 257, 0.9), (1, 4, 768, 0.1)]
    for seed, rows, cols, p in cases:
        ours = gpt1.add_layernorm_dropout_mask(seed_tensor(seed), rows, cols, p)
        assert torch.equal(ours, triton_mask(seed_tensor(seed), rows, cols, p))


def test_dropout_mask_without_dropout_keeps_everything():
    assert gpt1.add_layernorm_dropout_mask(seed_tensor(1), 3, 5, 0.0).all()


def test_dropout_refuses_shapes_whose_counters_would_collide():
    """Counters hold i and j // 8 in 32 bits each: more than 2³² rows or 2³⁵ columns are refused
    (checked on the sizes, so no such tensor is needed)."""
    with pytest.raises(RuntimeError, match=re.escape("rows <= 2**32 and columns <= 2**35")):
        gpt1.add_layernorm_dropout_mask(seed_tensor(1), 2**32 + 1, 0, 0.5)
    with pytest.raises(RuntimeError, match=re.escape("got 0 rows of 34359738369")):
        gpt1.add_layernorm_dropout_mask(seed_tensor(1), 0, 2**35 + 1, 0.5)
    # at the limits, and beyond them without dropout, nothing is drawn and nothing refused
    assert gpt1.add_layernorm_dropout_mask(seed_tensor(1), 2**32, 0, 0.5).shape == (2**32, 0)
    assert gpt1.add_layernorm_dropout_mask(seed_tensor(1), 0, 2**35 + 1, 0.0).shape == (0, 2**35 + 1)


def test_weight_grads_are_deterministic_and_thread_count_independent():
    x, r, w, b, dy = make_inputs(301, 48)  # 10 row blocks, the last one partial
    _, grads = run_fused(x, r, w, b, dy, 0.2, seed_tensor(5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, grads_one_thread = run_fused(x, r, w, b, dy, 0.2, seed_tensor(5))
    finally:
        torch.set_num_threads(threads)
    for got, again in zip(grads, grads_one_thread):
        assert torch.equal(got, again)


def test_fused_path_dispatches_the_cpp_ops(gpt1_ops_run_by):
    x, r, w, b, dy = make_inputs(5, 16)
    x.requires_grad_()
    names = gpt1_ops_run_by(lambda: ops.add_layernorm(x, r, w, b, EPS, 0.1).backward(dy))
    assert names == ["add_layernorm_fwd", "add_layernorm_bwd"]


_X, _R, _W, _B, _DY = make_inputs(4, 8)
_S = seed_tensor(1)
BAD_FORWARD = {  # case → (arguments, expected message)
    "1-D x": ((_X[0], _R[0], _W, _B, EPS, 0.0, None), "x must be 2-D (N, C)"),
    "integer x": ((_X.long(), _R.long(), _W, _B, EPS, 0.0, None),
                  "x must be float32, float64, bfloat16 or float16, got Long"),
    "residual shape": ((_X, _R[:3], _W, _B, EPS, 0.0, None), "residual must have shape [4, 8] (as x), got [3, 8]"),
    "integer residual": ((_X, _R.int(), _W, _B, EPS, 0.0, None),
                         "residual must be float32, float64, bfloat16 or float16, got Int"),
    "weight shape": ((_X, _R, _W[:7], _B, EPS, 0.0, None), "weight must have shape (8,), got [7]"),
    "bias shape": ((_X, _R, _W, _B[:2], EPS, 0.0, None), "bias must have shape (8,), got [2]"),
    "negative eps": ((_X, _R, _W, _B, -1.0, 0.0, None), "eps must be >= 0, got -1"),
    "dropout_p = 1": ((_X, _R, _W, _B, EPS, 1.0, _S), "dropout_p must be in [0, 1), got 1"),
    "missing seed": ((_X, _R, _W, _B, EPS, 0.5, None), "dropout_p = 0.5 > 0 needs a seed tensor, got None"),
    "int32 seed": ((_X, _R, _W, _B, EPS, 0.5, _S.int()), "seed must be an int64 CPU tensor of one element, got Int"),
}


@pytest.mark.parametrize("case", BAD_FORWARD)
def test_bad_forward_inputs_raise(case):
    args, message = BAD_FORWARD[case]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        gpt1.add_layernorm_fwd(*args)


def test_bad_backward_inputs_raise():
    _, mean, rstd = gpt1.add_layernorm_fwd(_X, _R, _W, _B, EPS, 0.0, None)
    with pytest.raises(RuntimeError, match=r"grad_y must have shape \[4, 8\], got \[2, 8\]"):
        gpt1.add_layernorm_bwd(_DY[:2], _X, _R, _W, mean, rstd, 0.0, None)
    with pytest.raises(RuntimeError, match="mean must have dtype Float, got Double"):
        gpt1.add_layernorm_bwd(_DY, _X, _R, _W, mean.double(), rstd, 0.0, None)
    with pytest.raises(RuntimeError, match="rows and cols must be >= 0, got -1 and 4"):
        gpt1.add_layernorm_dropout_mask(_S, -1, 4, 0.5)
