"""csrc/linear_gelu.cpp (gpt1::linear_gelu_* on CPU) against engine.reference.linear_gelu."""
from __future__ import annotations

import re

import pytest
import torch

from engine import ops, reference
from helpers import assert_close, assert_fa_rule

GRAD_NAMES = ("grad_x", "grad_weight", "grad_bias")
gpt1 = torch.ops.gpt1


def make_inputs(N, C, F, dtype=torch.float32, seed=0):
    """x, weight, bias (pre-activations spread over the GELU's curved range) and the one
    upstream gradient dy shared by every comparison."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(dtype)
    w = (torch.randn(F, C, generator=g) * 2.0 / C**0.5).to(dtype)
    b = (0.5 * torch.randn(F, generator=g)).to(dtype)
    dy = torch.randn(N, F, generator=g).to(dtype)
    return x, w, b, dy


def run(fn, x, w, b, dy, approximate, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = fn(*leaves, approximate, **kwargs)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


def run_exact_reference(x, w, b, dy, approximate):
    """The reference in float64, cast to float32: what an fp32 kernel should give."""
    y, grads = run(reference.linear_gelu, *(t.double() for t in (x, w, b, dy)), approximate)
    return y.float(), [g.float() for g in grads]


SHAPES = [(1, 16, 8), (7, 13, 29), (37, 96, 100), (64, 256, 1024), (130, 48, 3)]


@pytest.mark.parametrize("N,C,F", SHAPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_fp32_forward_and_grads_match_reference(N, C, F, approximate):
    x, w, b, dy = make_inputs(N, C, F)
    y, grads = run(ops.linear_gelu, x, w, b, dy, approximate)
    y_ref, grads_ref = run_exact_reference(x, w, b, dy, approximate)
    assert_close(y, y_ref, "y")
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        assert_close(got, want, name)
    _, pre = gpt1.linear_gelu_fwd(x, w, b, approximate)
    assert_close(pre, (x.double() @ w.double().t() + b.double()).float(), "pre")


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_accurate_far_into_the_tails(approximate):
    # pre-activations from -30 to 30 (x = z, W = I, b = 0): saturation, underflow of the exp terms
    z = torch.linspace(-30, 30, 4001).reshape(-1, 1)
    x, w, b, dy = z, torch.ones(1, 1), torch.zeros(1), torch.ones_like(z)
    y, grads = run(ops.linear_gelu, x, w, b, dy, approximate)
    y_ref, grads_ref = run_exact_reference(x, w, b, dy, approximate)
    assert_close(y, y_ref, "y")
    assert_close(grads[0], grads_ref[0], "GELU'(z)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_low_precision_fa_rule(dtype, approximate):
    x, w, b, dy = make_inputs(37, 96, 100, dtype)
    y, grads = run(ops.linear_gelu, x, w, b, dy, approximate)
    y_ref, grads_ref = run(reference.linear_gelu, *(t.float() for t in (x, w, b, dy)), approximate, upcast=True)
    y_low, grads_low = run(reference.linear_gelu, x, w, b, dy, approximate)
    assert y.dtype == dtype
    assert_fa_rule(y, y_ref, y_low, "y")
    for name, got, want, low in zip(GRAD_NAMES, grads, grads_ref, grads_low):
        assert got.dtype == dtype
        assert_fa_rule(got, want, low, name)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gradcheck_float64_through_engine_ops(approximate):
    x, w, b, _ = make_inputs(3, 5, 4, torch.float64)
    args = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *a: ops.linear_gelu(*a, approximate), args)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_opcheck(approximate):
    x, w, b, dy = make_inputs(6, 10, 12)
    args = [t.requires_grad_() for t in (x, w, b)]
    torch.library.opcheck(gpt1.linear_gelu_fwd.default, (*args, approximate))
    _, pre = gpt1.linear_gelu_fwd(x, w, b, approximate)
    torch.library.opcheck(gpt1.linear_gelu_bwd.default, (dy, x.detach(), w.detach(), pre.detach(), approximate))


def test_grad_bias_is_deterministic_and_thread_count_independent():
    x, w, b, dy = make_inputs(301, 40, 70)  # 10 row blocks, the last one partial
    _, grads = run(ops.linear_gelu, x, w, b, dy, "tanh")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, grads_one_thread = run(ops.linear_gelu, x, w, b, dy, "tanh")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[2], grads_one_thread[2])


def test_non_contiguous_inputs_give_the_contiguous_result():
    x, w, b, _ = make_inputs(12, 40, 30)
    xt = x.t().contiguous().t()  # column-major
    strided = gpt1.linear_gelu_fwd(xt, w.t().contiguous().t(), torch.stack([b, b], 1)[:, 0], "tanh")
    dense = gpt1.linear_gelu_fwd(x, w, b, "tanh")
    for got, want in zip(strided, dense):
        assert_close(got, want)


def test_fused_path_dispatches_the_cpp_ops(gpt1_ops_run_by):
    x, w, b, dy = make_inputs(6, 5, 8)
    w.requires_grad_()
    names = gpt1_ops_run_by(lambda: ops.linear_gelu(x.view(2, 3, 5), w, b).backward(dy.view(2, 3, 8)))
    assert names == ["linear_gelu_fwd", "linear_gelu_bwd"]


_X, _W, _B, _DY = make_inputs(4, 8, 6)
BAD_FORWARD = {  # case → (arguments, expected message)
    "1-D x": ((_X[0], _W, _B, "tanh"), "x must be 2-D (N, C), got shape [8]"),
    "integer x": ((_X.long(), _W, _B, "tanh"), "x must be float32, float64, bfloat16 or float16, got Long"),
    "weight width": ((_X, _W[:, :7], _B, "tanh"), "weight must have shape (F, 8), got [6, 7]"),
    "weight dtype": ((_X, _W.double(), _B, "tanh"), "weight must have dtype Float, got Double"),
    "bias shape": ((_X, _W, _B[:5], "tanh"), "bias must have shape [6], got [5]"),
    "approximate": ((_X, _W, _B, "erf"), "approximate must be 'tanh' or 'none', got 'erf'"),
}


@pytest.mark.parametrize("case", BAD_FORWARD)
def test_bad_forward_inputs_raise(case):
    args, message = BAD_FORWARD[case]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        gpt1.linear_gelu_fwd(*args)


def test_bad_backward_inputs_raise():
    _, pre = gpt1.linear_gelu_fwd(_X, _W, _B, "tanh")
    with pytest.raises(RuntimeError, match=re.escape("grad_y must have shape [4, 6], got [4, 5]")):
        gpt1.linear_gelu_bwd(_DY[:, :5], _X, _W, pre, "tanh")
    with pytest.raises(RuntimeError, match=re.escape("pre must have dtype Float, got Half")):
        gpt1.linear_gelu_bwd(_DY, _X, _W, pre.half(), "tanh")
