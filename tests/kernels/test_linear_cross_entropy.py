"""kernels/linear_cross_entropy.py against engine.reference.linear_cross_entropy (interpreter).

The launcher returns the gradients of the mean loss, i.e. for an upstream gradient of 1; the
through-engine.ops test checks the scaling by another upstream gradient.
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
from kernels.linear_cross_entropy import linear_cross_entropy_fwd

ROOT = Path(__file__).resolve().parents[2]
IGNORE = -100
V_PRIME = 1009  # not a power of two: the last vocabulary block is partial


def make_inputs(N: int, C: int, V: int, dtype: torch.dtype, n_ignored: int = 3, seed: int = 0):
    """hidden, weight, targets with n_ignored rows set to IGNORE; logits ~ N(0, 4)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g).to(dtype)
    weight = (2.0 * torch.randn(V, C, generator=g) / C**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:n_ignored]] = IGNORE
    return hidden, weight, targets


def run_reference(hidden, weight, targets, ignore_index=IGNORE, upcast=False):
    """loss and (grad_hidden, grad_weight) of the reference, by autograd, in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
    loss = reference.linear_cross_entropy(*leaves, targets, ignore_index, upcast=upcast)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def run_exact_reference(hidden, weight, targets, ignore_index=IGNORE):
    """The reference in float64, results in float32: what an fp32 kernel should give."""
    loss, grads = run_reference(hidden.double(), weight.double(), targets, ignore_index)
    return loss.float(), [g.float() for g in grads]


@pytest.mark.parametrize("N,C", [(1, 48), (37, 48), (13, 96)])
@pytest.mark.parametrize("chunk_rows", [None, 5], ids=["one_chunk", "chunks_of_5"])
def test_fp32_loss_and_grads(N, C, chunk_rows):
    hidden, weight, targets = make_inputs(N, C, V_PRIME, torch.float32, n_ignored=min(3, N - 1))
    loss, grad_h, grad_w = linear_cross_entropy_fwd(hidden, weight, targets, IGNORE, True, chunk_rows=chunk_rows)
    loss_ref, (grad_h_ref, grad_w_ref) = run_exact_reference(hidden, weight, targets)
    assert loss.shape == () and loss.dtype == torch.float32
    assert_close(loss, loss_ref, "loss")
    assert_close(grad_h, grad_h_ref, "grad_hidden")
    assert_close(grad_w, grad_w_ref, "grad_weight")


def test_chunk_of_one_row_and_ignore_index_inside_the_vocabulary():
    # ignore_index = 0 is also a class id: rows targeting 0 are the ignored ones
    hidden, weight, targets = make_inputs(11, 48, 257, torch.float32, n_ignored=0)
    targets[[2, 7]] = 0
    loss, grad_h, grad_w = linear_cross_entropy_fwd(hidden, weight, targets, 0, True, chunk_rows=1)
    loss_ref, (grad_h_ref, grad_w_ref) = run_exact_reference(hidden, weight, targets, ignore_index=0)
    assert_close(loss, loss_ref, "loss")
    assert_close(grad_h, grad_h_ref, "grad_hidden")
    assert_close(grad_w, grad_w_ref, "grad_weight")
    assert grad_h[2].abs().max() == 0 and grad_h[7].abs().max() == 0  # ignored rows get no gradient


def test_without_grad_returns_the_loss_and_empty_tensors():
    hidden, weight, targets = make_inputs(9, 48, V_PRIME, torch.float32)
    loss, grad_h, grad_w = linear_cross_entropy_fwd(hidden, weight, targets, IGNORE, False, chunk_rows=4)
    assert grad_h.numel() == 0 and grad_w.numel() == 0
    assert_close(loss, run_exact_reference(hidden, weight, targets)[0], "loss")


def test_all_targets_ignored_gives_nan_loss_and_zero_grads():
    hidden, weight, targets = make_inputs(6, 48, 257, torch.float32)
    targets[:] = IGNORE
    loss, grad_h, grad_w = linear_cross_entropy_fwd(hidden, weight, targets, IGNORE, True, chunk_rows=4)
    loss_ref, (grad_h_ref, grad_w_ref) = run_reference(hidden, weight, targets)
    assert torch.isnan(loss) and torch.isnan(loss_ref)
    assert torch.equal(grad_h, grad_h_ref) and torch.equal(grad_w, grad_w_ref)  # all zeros


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("chunk_rows", [None, 8], ids=["one_chunk", "chunks_of_8"])
def test_low_precision_fa_rule(dtype, chunk_rows):
    hidden, weight, targets = make_inputs(29, 96, V_PRIME, dtype)
    loss, grad_h, grad_w = linear_cross_entropy_fwd(hidden, weight, targets, IGNORE, True, chunk_rows=chunk_rows)
    loss_ref, (grad_h_ref, grad_w_ref) = run_reference(hidden.float(), weight.float(), targets, upcast=True)
    loss_low, (grad_h_low, grad_w_low) = run_reference(hidden, weight, targets)
    assert loss.dtype == torch.float32 and grad_h.dtype == dtype and grad_w.dtype == dtype
    assert_fa_rule(loss, loss_ref, loss_low, "loss")
    assert_fa_rule(grad_h, grad_h_ref, grad_h_low, "grad_hidden")
    assert_fa_rule(grad_w, grad_w_ref, grad_w_low, "grad_weight")


_H, _W, _T = make_inputs(4, 8, 11, torch.float32, n_ignored=1)
BAD = {  # case → (arguments, expected message)
    "target = V": ((_H, _W, torch.tensor([0, 11, 3, IGNORE]), IGNORE, True), "got targets[1] = 11"),
    "negative target": (
        (_H, _W, torch.tensor([0, 1, -1, IGNORE]), IGNORE, False),
        "in [0, 11) or ignore_index=-100, got targets[2] = -1",
    ),
    "1-D hidden": ((_H[0], _W, _T, IGNORE, True), "hidden must be 2-D (N, C ≥ 1)"),
    "weight width": ((_H, _W[:, :5], _T, IGNORE, True), "weight must be (V ≥ 1, 8) torch.float32"),
    "weight dtype": ((_H, _W.double(), _T, IGNORE, True), "got torch.float64 of shape (11, 8)"),
    "int32 targets": ((_H, _W, _T.int(), IGNORE, True), "targets must be int64 of shape (4,)"),
    "targets shape": ((_H, _W, _T[:3], IGNORE, True), "got torch.int64 of shape (3,)"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_raise(case):
    args, message = BAD[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        linear_cross_entropy_fwd(*args)


def test_bad_chunk_rows_raises():
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        linear_cross_entropy_fwd(_H, _W, _T, IGNORE, True, chunk_rows=0)


_THROUGH_OPS = r"""
import sys, torch
from engine import ops
hidden, weight, targets, upstream = torch.load(sys.argv[1])
leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
loss = ops.linear_cross_entropy(leaves[0].view(2, 3, -1), leaves[1], targets.view(2, 3))  # (B, T)
(loss * upstream).backward()
with torch.no_grad():
    loss_no_grad = ops.linear_cross_entropy(hidden, weight, targets)
args = [t.clone().requires_grad_() for t in (hidden, weight)]
torch.library.opcheck(torch.ops.gpt1.linear_cross_entropy_fwd.default, (*args, targets, -100, True))
torch.library.opcheck(torch.ops.gpt1.linear_cross_entropy_fwd.default, (hidden, weight, targets, -100, False))
torch.save((loss.detach(), loss_no_grad, [t.grad for t in leaves]), sys.argv[2])
"""


def test_through_engine_ops_with_triton_cpu_kernels(tmp_path):
    """engine.ops.linear_cross_entropy (registration, fake kernel, autograd) served by this launcher."""
    hidden, weight, targets = make_inputs(6, 48, 257, torch.float32, n_ignored=2)
    upstream = 2.5  # backward scales the forward's gradients by it
    torch.save((hidden, weight, targets, upstream), tmp_path / "in.pt")
    env = dict(os.environ, GPT1_CPU_KERNELS="triton", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _THROUGH_OPS, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    loss, loss_no_grad, grads = torch.load(tmp_path / "out.pt")
    loss_ref, grads_ref = run_exact_reference(hidden, weight, targets)
    assert_close(loss, loss_ref, "loss")
    assert_close(loss_no_grad, loss_ref, "loss (no grad)")
    for name, got, want in zip(("grad_hidden", "grad_weight"), grads, grads_ref):
        assert_close(got, upstream * want, name)
