"""The LM head's padded vocabulary and fp16 scaling (kernels/linear_cross_entropy.py), under the
interpreter (or on the GPU) at small shapes: V ≡ 6 (mod 8) like GPT-1's 40478, padded inside the
op to a multiple of PAD; gradients come back with V rows; fp16 gradients of a mean over many rows do
not underflow."""

from __future__ import annotations

import pytest
import torch

from backends import TRITON
from engine.model import reference
from gpt1_kernels import linear_cross_entropy as lce
from helpers import assert_close

IGNORE = -100


def make_inputs(N: int, C: int, V: int, dtype: torch.dtype, logit_scale: float = 2.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g).to(dtype)
    weight = (logit_scale * torch.randn(V, C, generator=g) / C**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = IGNORE
    return hidden, weight, targets


def exact_reference(hidden, weight, targets):
    """loss, grad_hidden, grad_weight of the reference in float64 (results float32)."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    loss = reference.linear_cross_entropy(*leaves, targets, IGNORE)
    loss.backward()
    return loss.float(), leaves[0].grad.float(), leaves[1].grad.float()


@pytest.mark.parametrize("V", [70, 134, 64])  # ≡ 6 (mod 8) twice, and already a multiple of PAD
@pytest.mark.parametrize("chunk_rows", [None, 6])
def test_padded_vocabulary_matches_the_reference(V, chunk_rows):
    assert lce.chunk_launch(V, cuda=False)["LD"] % lce.PAD == 0
    hidden, weight, targets = make_inputs(19, 32, V, torch.float32)
    targets[3] = V - 1  # the last real class, next to the padding
    args = (TRITON.tensor(t) for t in (hidden, weight, targets))
    loss, grad_h, grad_w = (t.cpu() for t in lce.linear_cross_entropy_fwd(*args, IGNORE, True, chunk_rows=chunk_rows))
    loss_ref, grad_h_ref, grad_w_ref = exact_reference(hidden, weight, targets)
    assert grad_w.shape == weight.shape, "grad_weight must keep the V rows of the weight"
    assert_close(loss, loss_ref, "loss")
    assert_close(grad_h, grad_h_ref, "grad_hidden")
    assert_close(grad_w, grad_w_ref, "grad_weight")


def test_fp16_gradients_of_a_mean_over_many_rows_do_not_underflow():
    """Rows of grad_weight whose token is no row's target are pure softmax mass: Σ_i p_ij h_i / n.
    With V = 2046 and 300 rows, p_ij / n_valid ≈ 1.6e-6 is an fp16 subnormal (6e-8 steps, ~4%), so
    storing G already divided by n_valid loses it (measured: 2.8e-3 relative error); stored unscaled
    with 1/n_valid applied in fp32 after the GEMMs it keeps fp16's precision (5e-4)."""
    V = 2046
    hidden, weight, targets = make_inputs(300, 16, V, torch.float16, logit_scale=0.5)
    args = (TRITON.tensor(t) for t in (hidden, weight, targets))
    _, grad_h, grad_w = (t.cpu() for t in lce.linear_cross_entropy_fwd(*args, IGNORE, True, chunk_rows=64))
    _, grad_h_ref, grad_w_ref = exact_reference(hidden, weight, targets)
    free = torch.ones(V, dtype=torch.bool)
    free[targets[targets != IGNORE]] = False
    for name, got, want in (
        ("grad_hidden", grad_h, grad_h_ref),
        ("grad_weight (untargeted rows)", grad_w[free], grad_w_ref[free]),
    ):
        scale = want.abs().max().item()
        err = (got.float() - want).abs().max().item()
        assert err <= 4 * 2.0**-11 * scale, f"{name}: error {err:.3e} > 4 fp16 ulps of scale {scale:.3e}"
