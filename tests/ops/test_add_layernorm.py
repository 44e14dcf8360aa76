"""gpt1::add_layernorm_* on every backend against engine.model.reference.add_layernorm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backends import CPP, TRITON, cases
from engine import ops
from engine.model import reference
from helpers import assert_close, assert_fa_rule, autograd_reference, exact_reference
from philox_ref import keep_mask

EPS = 1e-5
GRAD_NAMES = ("grad_x", "grad_residual", "grad_weight", "grad_bias")
gpt1 = torch.ops.gpt1


def make_inputs(N, C, dtype=torch.float32, param_dtype=None, seed=0):
    """x, residual, weight, bias (CPU), and the one upstream gradient dy of every comparison."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(dtype)
    r = (2.0 * torch.randn(N, C, generator=g) + 0.5).to(dtype)  # another scale and offset
    w = (1.0 + 0.5 * torch.randn(C, generator=g)).to(param_dtype or dtype)
    b = (0.5 * torch.randn(C, generator=g)).to(param_dtype or dtype)
    return x, r, w, b, torch.randn(N, C, generator=g).to(dtype)


def run(backend, x, r, w, b, dy, p=0.0, seed=None):
    """y and (dx, dr, dw, db) through the registered op and its autograd, back on the CPU."""
    leaves = [backend.tensor(t).requires_grad_() for t in (x, r, w, b)]
    y, _, _ = gpt1.add_layernorm_fwd(*leaves, EPS, p, None if seed is None else backend.seed(seed))
    y.backward(backend.tensor(dy))
    return y.detach().cpu(), [t.grad.cpu() for t in leaves]


def mask_of(backend, seed, rows, cols, p):
    return gpt1.add_layernorm_dropout_mask(backend.seed(seed), rows, cols, p).cpu()


def reference_of(x, r, w, b, dy, p, mask, exact=True, **kwargs):
    fn = exact_reference if exact else autograd_reference
    return fn(reference.add_layernorm, (x, r, w, b), dy, EPS, p, dropout_mask=mask, **kwargs)


# (N, C): one element, C = 1, widths below and past a tile, not powers of two, GPT-1's 768
SHAPES = [(1, 1), (3, 1), (1, 7), (37, 96), (17, 100), (5, 768), (70, 48)]


@pytest.mark.parametrize("backend,shape", cases(SHAPES, compiled=[(37, 257), (301, 1000)]), indirect=["backend"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fp32_forward_stats_and_grads(backend, shape, p):
    N, C = shape
    x, r, w, b, dy = make_inputs(N, C)
    mask = mask_of(backend, 1234, N, C, p) if p else None
    y, grads = run(backend, x, r, w, b, dy, p, 1234 if p else None)
    y_ref, grads_ref = reference_of(x, r, w, b, dy, p, mask)
    assert_close(y, y_ref, "y")
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        assert_close(got, want, name)
    # the saved statistics, of s = x + dropout(r) in float64
    _, mean, rstd = gpt1.add_layernorm_fwd(
        *(backend.tensor(t) for t in (x, r, w, b)), EPS, p, backend.seed(1234) if p else None
    )
    s = x.double() + (r.double() * mask / (1 - p) if p else r.double())
    assert_close(mean.cpu(), s.mean(1).float(), "mean")
    assert_close(rstd.cpu(), (s.var(1, unbiased=False) + EPS).rsqrt().float(), "rstd")


def test_grad_residual_is_empty_without_dropout(backend):
    """d(x + r)/dr = 1: the op leaves grad_residual empty and engine.ops reuses grad_x."""
    x, r, w, b, dy = (backend.tensor(t) for t in make_inputs(4, 8))
    _, mean, rstd = gpt1.add_layernorm_fwd(x, r, w, b, EPS, 0.0, None)
    dx, dr, _, _ = gpt1.add_layernorm_bwd(dy, x, r, w, mean, rstd, 0.0, None)
    assert dr.numel() == 0 and dx.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("param_dtype", ["same", torch.float32], ids=["params_same", "params_fp32"])
@pytest.mark.parametrize("N,C,p", [(37, 96, 0.0), (19, 768, 0.1)])
def test_low_precision_fa_rule(backend, dtype, param_dtype, N, C, p):
    param_dtype = dtype if param_dtype == "same" else param_dtype
    x, r, w, b, dy = make_inputs(N, C, dtype, param_dtype)
    mask = mask_of(backend, 99, N, C, p) if p else None
    y, grads = run(backend, x, r, w, b, dy, p, 99 if p else None)
    y_ref, grads_ref = reference_of(*(t.float() for t in (x, r, w, b, dy)), p, mask, exact=False, upcast=True)
    y_low, grads_low = reference_of(x, r, w, b, dy, p, mask, exact=False)
    assert y.dtype == dtype and grads[2].dtype == param_dtype
    assert_fa_rule(y, y_ref, y_low, "y")
    for name, got, want, low in zip(GRAD_NAMES, grads, grads_ref, grads_low):
        if got.dtype == torch.float32:  # float32 gain/bias: both sides reduce in float32
            assert_close(got, want, name)
        else:
            assert_fa_rule(got, want, low, name)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_autocast_layout_fp32_stream_bf16_residual(backend, p):
    """Under autocast the stream x stays float32 and the residual is a bf16 matmul output: y and
    grad_x are float32 (exact to fp32 tolerance), grad_residual comes back in bf16."""
    N, C = 23, 96
    x, r, w, b, dy = make_inputs(N, C)
    r = r.to(torch.bfloat16)
    mask = mask_of(backend, 7, N, C, p) if p else None
    y, grads = run(backend, x, r, w, b, dy, p, 7 if p else None)
    y_ref, grads_ref = reference_of(x, r.float(), w, b, dy, p, mask)
    _, grads_pt = reference_of(x, r, w, b, dy, p, mask, exact=False)  # fp32 math, grad cast to bf16
    assert y.dtype == grads[0].dtype == torch.float32 and grads[1].dtype == torch.bfloat16
    assert_close(y, y_ref, "y")
    for name, got, want, pt in zip(GRAD_NAMES, grads, grads_ref, grads_pt):
        if name == "grad_residual":
            assert_fa_rule(got, want, pt, name)
        else:
            assert_close(got, want, name)


def test_strided_inputs_give_the_contiguous_result(backend):
    x, r, w, b, _ = (backend.tensor(t) for t in make_inputs(12, 80))
    strided = (x[:, ::2], r[:, ::2], w[::2], b[::2])  # every other column
    dense = gpt1.add_layernorm_fwd(*(t.contiguous() for t in strided), EPS, 0.0, None)
    strided = gpt1.add_layernorm_fwd(*strided, EPS, 0.0, None)
    for got, want in zip(strided, dense):
        assert torch.equal(got, want)


# ---- dropout ----------------------------------------------------------------------------


def test_dropout_same_seed_is_bit_identical_and_seeds_differ(backend):
    x, r, w, b, dy = make_inputs(23, 96)
    first, again, other = (run(backend, x, r, w, b, dy, 0.3, s) for s in (7, 7, 8))
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])
    for got, want in zip(first[1], again[1]):
        assert torch.equal(got, want)
    m7, m8, m7_high = (mask_of(backend, s, 23, 96, 0.3) for s in (7, 8, 7 + 2**40))
    assert (m7 != m8).float().mean() > 0.2  # independent masks differ in ~2p(1-p) = 42%
    assert not torch.equal(m7, m7_high)  # the seed's high word is part of the key too


def test_dropout_through_engine_ops_follows_torch_manual_seed(backend):
    x, r, w, b, _ = (backend.tensor(t) for t in make_inputs(9, 32))
    torch.manual_seed(5)
    y1 = ops.add_layernorm(x, r, w, b, EPS, 0.4)
    torch.manual_seed(5)
    y2 = ops.add_layernorm(x, r, w, b, EPS, 0.4)
    y3 = ops.add_layernorm(x, r, w, b, EPS, 0.4)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    torch.manual_seed(5)  # the seed engine.ops drew, and the mask it means
    mask = gpt1.add_layernorm_dropout_mask(ops.new_seed(x, 0.4), 9, 32, 0.4).cpu()
    expected = reference.add_layernorm(*(t.cpu().double() for t in (x, r, w, b)), EPS, 0.4, dropout_mask=mask)
    assert_close(y1.cpu(), expected.float(), "y")


@pytest.mark.gpu_first
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate_and_scaling(backend, p):
    rows, cols = 256, 1000
    keep = mask_of(backend, 2024, rows, cols, p).double()
    q = round(p * 2**16) / 2**16  # the realised drop rate: 16-bit draws against round(p·2¹⁶)
    # 5 binomial standard deviations (false alarm ~6e-7)
    assert abs(keep.mean().item() - (1 - q)) < 5 * math.sqrt(q * (1 - q) / (rows * cols))
    # no stripes: every column within 6 sigma of its own 256-draw binomial (a column is one draw
    # position of one Philox word: a bad position or word shows here)
    assert (keep.mean(0) - (1 - q)).abs().max().item() < 6 * math.sqrt(q * (1 - q) / rows)
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, :8], keep[:, 8:16])
    # scaling: x = 0, weight = 1, bias = 0 and eps huge give y ≈ s / √eps, s = r·keep/(1 − p)
    args = (torch.zeros(rows, cols), torch.ones(rows, cols), torch.ones(cols), torch.zeros(cols))
    y, _, _ = gpt1.add_layernorm_fwd(*(backend.tensor(t) for t in args), 1e12, p, backend.seed(2024))
    expected = keep / (1 - p)
    assert_close(y.cpu() * 1e6, (expected - expected.mean(1, keepdim=True)).float(), "scaled residual minus mean")


def test_dropout_mask_without_dropout_keeps_everything(backend):
    assert mask_of(backend, 1, 3, 5, 0.0).all()


@pytest.mark.gpu_first
@pytest.mark.parametrize("rows,cols", [(70, 7), (3, 1), (5, 100), (2, 257), (9, 64)])
def test_dropout_mask_is_the_documented_philox_draw(backend, rows, cols):
    """keep(i, j) is tests/philox_ref.py's keep_mask with stream 0, bit for bit, at widths not a
    multiple of 8 or below it, and row counts past one program's rows."""
    seed, p = 2**61 + 987654321, 0.35  # the seed's high word keys Philox too
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    expected = keep_mask(seed, p, i, j, stream=np.zeros_like(i))
    assert np.array_equal(mask_of(backend, seed, rows, cols, p).numpy(), expected)


@pytest.mark.gpu_first
@pytest.mark.parametrize("tile", [8, 64])  # 8: one row per program
def test_triton_mask_does_not_depend_on_its_tiles(monkeypatch, tile):
    pytest.importorskip("triton")
    from gpt1_kernels import add_layernorm as kernel

    seed = TRITON.seed(2**61 + 987654321)
    default = kernel.add_layernorm_dropout_mask(seed, 70, 100, 0.35)
    monkeypatch.setattr(kernel, "_TILE", tile)
    assert torch.equal(kernel.add_layernorm_dropout_mask(seed, 70, 100, 0.35), default)


@pytest.mark.cpp
def test_dropout_masks_of_both_backends_are_bit_identical():
    """The cross-backend contract: the C++ and the Triton kernels drop the same elements."""
    pytest.importorskip("triton")
    assert ops.cpu_kernels_error() is None, ops.cpu_kernels_error()
    from gpt1_kernels.add_layernorm import add_layernorm_dropout_mask as triton_mask

    for seed, rows, cols, p in [
        (123456789012345, 7, 33, 0.3),
        (2**62 - 1, 5, 100, 0.1),
        (5, 70, 7, 0.5),
        (2**40 + 9, 3, 1, 0.2),
        (77, 2, 257, 0.9),
        (1, 4, 768, 0.1),
    ]:
        cpp = gpt1.add_layernorm_dropout_mask(CPP.seed(seed), rows, cols, p)  # the C++ CPU kernel
        assert torch.equal(cpp, triton_mask(TRITON.seed(seed), rows, cols, p).cpu())


def test_dropout_refuses_shapes_whose_counters_would_collide(backend):
    """Counters hold i and j // 8 in 32 bits each: more than 2³² rows or 2³⁵ columns are refused
    (checked on the sizes, so no such tensor is needed)."""
    seed = backend.seed(1)
    with pytest.raises(ValueError, match=r"rows <= 2\*\*32 and columns <= 2\*\*35.*got 4294967297 rows of 0"):
        gpt1.add_layernorm_dropout_mask(seed, 2**32 + 1, 0, 0.5)
    with pytest.raises(ValueError, match="got 0 rows of 34359738369"):
        gpt1.add_layernorm_dropout_mask(seed, 0, 2**35 + 1, 0.5)
    # at the limits, and beyond them without dropout, nothing is drawn and nothing refused
    assert gpt1.add_layernorm_dropout_mask(seed, 2**32, 0, 0.5).shape == (2**32, 0)
    assert gpt1.add_layernorm_dropout_mask(seed, 0, 2**35 + 1, 0.0).shape == (0, 2**35 + 1)


# ---- the registered op ----------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck(backend, p):
    x, r, w, b, dy = (backend.tensor(t) for t in make_inputs(6, 10))
    seed = backend.seed(3) if p else None
    args = [t.clone().requires_grad_() for t in (x, r, w, b)]
    torch.library.opcheck(gpt1.add_layernorm_fwd.default, (*args, EPS, p, seed))
    _, mean, rstd = gpt1.add_layernorm_fwd(x, r, w, b, EPS, p, seed)
    torch.library.opcheck(gpt1.add_layernorm_bwd.default, (dy, x, r, w, mean, rstd, p, seed))
    torch.library.opcheck(gpt1.add_layernorm_dropout_mask.default, (backend.seed(3), 6, 10, p))


def test_double_backward_raises_a_clear_error(backend):
    x, r, w, b, _ = (backend.tensor(t) for t in make_inputs(4, 8))
    x.requires_grad_()
    (grad,) = torch.autograd.grad(ops.add_layernorm(x, r, w, b).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="gpt1::add_layernorm_bwd: double backward is not supported"):
        grad.sum().backward()


def test_fused_path_dispatches_the_ops(backend, gpt1_ops_run_by):
    x, r, w, b, dy = (backend.tensor(t) for t in make_inputs(5, 16))
    x.requires_grad_()
    names = gpt1_ops_run_by(lambda: ops.add_layernorm(x, r, w, b, EPS, 0.1).backward(dy))
    assert names == ["add_layernorm_fwd", "add_layernorm_bwd"]


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(backend, p):
    args = [t.requires_grad_() for t in make_inputs(4, 9, torch.float64)[:4]]
    seed = backend.seed(42) if p else None  # fixed: the function gradcheck differentiates is deterministic
    assert torch.autograd.gradcheck(lambda *a: gpt1.add_layernorm_fwd(*a, EPS, p, seed)[0], args)
    if p == 0:
        assert torch.autograd.gradcheck(lambda *a: ops.add_layernorm(*a, EPS), args)


def test_weight_grads_are_deterministic(backend, monkeypatch):
    """Fixed-order partial sums, no atomics: two runs give the same bits (Triton: few row groups,
    so programs loop over several row tiles and the last group is partial; C++: any thread count)."""
    if backend.name == "triton":
        from gpt1_kernels import add_layernorm as kernel

        monkeypatch.setattr(kernel, "_MAX_GROUPS", 3)
    x, r, w, b, dy = make_inputs(301, 48)
    _, grads = run(backend, x, r, w, b, dy, 0.2, 5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, again = run(backend, x, r, w, b, dy, 0.2, 5)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(grads, again):
        assert torch.equal(got, want)
    _, grads_ref = reference_of(x, r, w, b, dy, 0.2, mask_of(backend, 5, 301, 48, 0.2))
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        assert_close(got, want, name)


# ---- bad inputs: one table, the same ValueError on every backend -----------------------------

_X, _R, _W, _B, _DY = make_inputs(4, 8)
_MEAN, _RSTD = torch.zeros(4), torch.ones(4)
BAD = {  # case → (op, arguments (CPU; moved to the backend's device), pattern both messages match)
    "1-D x": ("add_layernorm_fwd", (_X[0], _R[0], _W, _B, EPS, 0.0, None), r"x must be 2-D \(N, C"),
    "integer x": (
        "add_layernorm_fwd",
        (_X.long(), _R.long(), _W, _B, EPS, 0.0, None),
        r"x must be .*float32.*(Long|int64)",
    ),
    "residual shape": (
        "add_layernorm_fwd",
        (_X, _R[:3], _W, _B, EPS, 0.0, None),
        r"residual must .*shape.*4, 8.*got.*3, 8",
    ),
    "integer residual": (
        "add_layernorm_fwd",
        (_X, _R.int(), _W, _B, EPS, 0.0, None),
        r"residual must be .*float32.*(Int|int32)",
    ),
    "weight shape": ("add_layernorm_fwd", (_X, _R, _W[:7], _B, EPS, 0.0, None), r"weight must .*\(8,\).*7"),
    "bias shape": ("add_layernorm_fwd", (_X, _R, _W, _B[:2], EPS, 0.0, None), r"bias must .*\(8,\).*2"),
    "negative eps": ("add_layernorm_fwd", (_X, _R, _W, _B, -1.0, 0.0, None), r"eps must be .*>= 0, got -1"),
    "dropout_p = 1": ("add_layernorm_fwd", (_X, _R, _W, _B, EPS, 1.0, "seed"), r"dropout_p must be in \[0, 1\), got 1"),
    "missing seed": (
        "add_layernorm_fwd",
        (_X, _R, _W, _B, EPS, 0.5, None),
        r"dropout_p ?= ?0\.5 .*needs a seed tensor, got None",
    ),
    "int32 seed": (
        "add_layernorm_fwd",
        (_X, _R, _W, _B, EPS, 0.5, torch.tensor([1], dtype=torch.int32)),
        r"seed must be an int64 .*(Int|int32)",
    ),
    "grad_y shape": ("add_layernorm_bwd", (_DY[:2], _X, _R, _W, _MEAN, _RSTD, 0.0, None), r"grad_y must .*4, 8.*2, 8"),
    "mean dtype": (
        "add_layernorm_bwd",
        (_DY, _X, _R, _W, _MEAN.double(), _RSTD, 0.0, None),
        r"mean must .*(Float|float32).*(Double|float64)",
    ),
    "mask rows": ("add_layernorm_dropout_mask", ("seed", -1, 4, 0.5), r"rows and cols must be >= 0, got -1 and 4"),
    "mask dropout_p": ("add_layernorm_dropout_mask", ("seed", 2, 4, -0.1), r"dropout_p must be in \[0, 1\), got -0\.1"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_raise_value_error(backend, case):
    op, args, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern):
        getattr(gpt1, op)(*backend.args(args))
