"""csrc/linear_cross_entropy.cpp (gpt1::linear_cross_entropy_fwd on CPU) against
engine.reference.linear_cross_entropy."""
from __future__ import annotations

import math
import re

import pytest
import torch

from engine import ops, reference
from helpers import assert_close, assert_fa_rule

IGNORE = -100
gpt1 = torch.ops.gpt1


def make_inputs(N, C, V, dtype=torch.float32, n_ignored=2, seed=0):
    """hidden, weight (logits of a few units: a non-trivial softmax) and int64 targets, a few
    of them (never all) ignore_index."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g).to(dtype)
    weight = (torch.randn(V, C, generator=g) * 2.0 / math.sqrt(C)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[: min(n_ignored, N - 1)]] = IGNORE
    return hidden, weight, targets


def run(fn, hidden, weight, targets, ignore_index=IGNORE, **kwargs):
    """loss and (grad_hidden, grad_weight) by autograd."""
    h, w = (t.detach().clone().requires_grad_() for t in (hidden, weight))
    loss = fn(h, w, targets, ignore_index, **kwargs)
    loss.backward()
    return loss.detach(), (h.grad, w.grad)


def run_exact_reference(hidden, weight, targets, ignore_index=IGNORE):
    """The reference in float64, cast to float32: what an fp32 kernel should give."""
    loss, grads = run(reference.linear_cross_entropy, hidden.double(), weight.double(), targets, ignore_index)
    return loss.float(), [g.float() for g in grads]


# V = 40478 (GPT-1's vocabulary, not a power of two) with 450 rows spans two chunks of logits
# (256 rows each), V = 4099 with 1100 rows two chunks of 1023 rows
SHAPES = [(1, 16, 13), (37, 48, 257), (64, 96, 1000), (450, 16, 40478), (1100, 16, 4099)]


@pytest.mark.parametrize("N,C,V", SHAPES)
def test_fp32_loss_and_grads_match_reference(N, C, V):
    hidden, weight, targets = make_inputs(N, C, V)
    loss, (grad_h, grad_w) = run(ops.linear_cross_entropy, hidden, weight, targets)
    loss_ref, (grad_h_ref, grad_w_ref) = run_exact_reference(hidden, weight, targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, loss_ref, "loss")
    assert_close(grad_h, grad_h_ref, "grad_hidden")
    assert_close(grad_w, grad_w_ref, "grad_weight")


def test_ignore_index_inside_the_vocabulary():
    # ignore_index = 0 is also a class id: rows targeting 0 are the ignored ones
    hidden, weight, targets = make_inputs(11, 48, 257, n_ignored=0)
    targets[[2, 7]] = 0
    loss, (grad_h, grad_w) = run(ops.linear_cross_entropy, hidden, weight, targets, 0)
    loss_ref, (grad_h_ref, grad_w_ref) = run_exact_reference(hidden, weight, targets, 0)
    assert_close(loss, loss_ref, "loss")
    assert_close(grad_h, grad_h_ref, "grad_hidden")
    assert_close(grad_w, grad_w_ref, "grad_weight")
    assert grad_h[2].abs().max() == 0 and grad_h[7].abs().max() == 0  # ignored rows get no gradient


def test_upstream_gradient_scales_the_gradients():
    hidden, weight, targets = make_inputs(9, 16, 31)
    h, w = (t.clone().requires_grad_() for t in (hidden, weight))
    (3.0 * ops.linear_cross_entropy(h, w, targets)).backward()
    _, (grad_h_ref, grad_w_ref) = run_exact_reference(hidden, weight, targets)
    assert_close(h.grad, 3.0 * grad_h_ref, "grad_hidden")
    assert_close(w.grad, 3.0 * grad_w_ref, "grad_weight")


def test_without_grad_returns_the_loss_and_empty_tensors():
    hidden, weight, targets = make_inputs(9, 48, 101)
    loss, grad_h, grad_w = gpt1.linear_cross_entropy_fwd(hidden, weight, targets, IGNORE, False)
    assert grad_h.numel() == 0 and grad_w.numel() == 0
    assert_close(loss, run_exact_reference(hidden, weight, targets)[0], "loss")
    with torch.no_grad():
        assert torch.equal(ops.linear_cross_entropy(hidden, weight.requires_grad_(), targets), loss)


def test_all_targets_ignored_gives_nan_loss_and_zero_grads():
    hidden, weight, targets = make_inputs(5, 16, 23)
    targets[:] = IGNORE
    loss, (grad_h, grad_w) = run(ops.linear_cross_entropy, hidden, weight, targets)
    loss_ref, (grad_h_ref, grad_w_ref) = run(reference.linear_cross_entropy, hidden, weight, targets)
    assert torch.isnan(loss) and torch.isnan(loss_ref)
    assert torch.equal(grad_h, grad_h_ref) and torch.equal(grad_w, grad_w_ref)  # zeros, as F.cross_entropy
    assert grad_h.abs().max() == 0 and grad_w.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_fa_rule(dtype):
    hidden, weight, targets = make_inputs(37, 96, 1000, dtype)
    loss, grads = run(ops.linear_cross_entropy, hidden, weight, targets)
    loss_ref, grads_ref = run(reference.linear_cross_entropy, hidden.float(), weight.float(), targets, upcast=True)
    loss_low, grads_low = run(reference.linear_cross_entropy, hidden, weight, targets)
    assert loss.dtype == torch.float32
    assert_fa_rule(loss, loss_ref, loss_low, "loss")
    for name, got, want, low in zip(("grad_hidden", "grad_weight"), grads, grads_ref, grads_low):
        assert got.dtype == dtype
        assert_fa_rule(got, want, low, name)


def test_float64_grads_match_reference_exactly():
    hidden, weight, targets = make_inputs(6, 5, 7, torch.float64)
    _, (grad_h, grad_w) = run(ops.linear_cross_entropy, hidden, weight, targets)
    _, (grad_h_ref, grad_w_ref) = run(reference.linear_cross_entropy, hidden, weight, targets)
    assert grad_h.dtype == torch.float64
    assert_close(grad_h, grad_h_ref, "grad_hidden")
    assert_close(grad_w, grad_w_ref, "grad_weight")


def test_gradcheck_float64_through_engine_ops():
    hidden, weight, targets = make_inputs(6, 5, 7, torch.float64)
    args = [hidden.requires_grad_(), weight.requires_grad_()]
    # The loss is float32 by contract (even for float64 inputs), so finite differences must be
    # wide enough to resolve it: eps = 1e-3 gives derivative noise of ~ulp(loss)/eps ≈ 5e-4 and
    # truncation error ~eps² ≈ 1e-6; a wrong formula is off by O(0.1).
    assert torch.autograd.gradcheck(
        lambda h, w: ops.linear_cross_entropy(h, w, targets), args, eps=1e-3, atol=2e-3, rtol=1e-3
    )


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck(compute_grad):
    hidden, weight, targets = make_inputs(6, 10, 17)
    args = (hidden.requires_grad_(), weight.requires_grad_(), targets, IGNORE, compute_grad)
    # without grads the op has no derivative, so the autograd checks do not apply
    utils = None if compute_grad else ("test_schema", "test_faketensor")
    kwargs = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(gpt1.linear_cross_entropy_fwd.default, args, **kwargs)


def test_result_is_thread_count_independent():
    hidden, weight, targets = make_inputs(300, 32, 5000)
    first = gpt1.linear_cross_entropy_fwd(hidden, weight, targets, IGNORE, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = gpt1.linear_cross_entropy_fwd(hidden, weight, targets, IGNORE, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], one_thread[0])  # per-row losses summed in row order


def test_non_contiguous_inputs_give_the_contiguous_result():
    hidden, weight, targets = make_inputs(12, 40, 30)
    strided = gpt1.linear_cross_entropy_fwd(hidden.t().contiguous().t(), weight.t().contiguous().t(),
                                            torch.stack([targets, targets], 1)[:, 0], IGNORE, True)
    dense = gpt1.linear_cross_entropy_fwd(hidden, weight, targets, IGNORE, True)
    for got, want in zip(strided, dense):
        assert_close(got, want)


def test_fused_path_dispatches_the_cpp_op(gpt1_ops_run_by):
    hidden, weight, targets = make_inputs(6, 8, 11)
    weight.requires_grad_()
    loss = lambda: ops.linear_cross_entropy(hidden.view(2, 3, 8), weight, targets.view(2, 3))  # noqa: E731
    names = gpt1_ops_run_by(lambda: loss().backward())
    assert names == ["linear_cross_entropy_fwd"]  # the gradients come out of the forward


_H, _W, _T = make_inputs(4, 8, 10)
BAD = {  # case → (arguments, expected message)
    "target too large": ((_H, _W, torch.tensor([1, 10, 2, 3]), IGNORE, True),
                         "targets[1] = 10 is outside [0, 10) and is not ignore_index = -100"),
    "negative target": ((_H, _W, torch.tensor([1, 2, -1, 3]), IGNORE, False),
                        "targets[2] = -1 is outside [0, 10) and is not ignore_index = -100"),
    "int32 targets": ((_H, _W, _T.int(), IGNORE, True), "targets must have dtype Long, got Int"),
    "targets length": ((_H, _W, _T[:3], IGNORE, True), "targets must have shape [4], got [3]"),
    "weight width": ((_H, _W[:, :7], _T, IGNORE, True), "weight must have shape (V, 8) with V >= 1, got [10, 7]"),
    "weight dtype": ((_H, _W.double(), _T, IGNORE, True), "weight must have dtype Float, got Double"),
    "3-D hidden": ((_H.view(2, 2, 8), _W, _T, IGNORE, True), "hidden must be 2-D (N, C), got shape [2, 2, 8]"),
    "integer hidden": ((_H.long(), _W.long(), _T, IGNORE, True),
                       "hidden must be float32, float64, bfloat16 or float16, got Long"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_raise(case):
    args, message = BAD[case]
    with pytest.raises(RuntimeError, match=re.escape(message)):
        gpt1.linear_cross_entropy_fwd(*args)
