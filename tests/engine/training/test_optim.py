"""OpenAI's Adam against a NumPy transcription of opt.py's update (the spec)."""

import copy
import math

import numpy as np
import pytest
import torch

from engine.training.optim import OpenAIAdam


def openai_adam_numpy(p, grads, lrs, b1=0.9, b2=0.999, e=1e-8, l2=0.0):
    """opt.py's adam, one parameter, lr·schedule given per update: the reference."""
    p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        lrt = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        decay = l2 * p if (p.ndim > 1 and l2 > 0) else 0.0
        p = p - lrt * (m / (np.sqrt(v) + e) + decay)
    return p


@pytest.mark.parametrize("shape", [(5, 3), (7,)])
def test_matches_openai_update(shape):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(shape)
    grads = [rng.standard_normal(shape) for _ in range(6)]
    lrs = [1e-2 * s for s in (0.25, 0.5, 1.0, 0.9, 0.5, 0.1)]  # a warm-up and decay
    expected = openai_adam_numpy(p0, grads, lrs, l2=0.01)
    p = torch.nn.Parameter(torch.tensor(p0))
    opt = OpenAIAdam([p], lr=lrs[0], weight_decay=0.01)
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-12, atol=1e-14)


def test_differs_from_adamw():
    """The same decay on a matrix moves it differently from AdamW (ε and decay scaling)."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 4)), None
    b = torch.nn.Parameter(a.detach().clone())
    oa, aw = OpenAIAdam([a], lr=1e-2, weight_decay=0.1), torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    g = torch.randn(4, 4) * 1e-6  # tiny gradients: ε placement matters
    for _ in range(3):
        a.grad, b.grad = g.clone(), g.clone()
        oa.step(), aw.step()
    assert (a - b).abs().max() > 1e-4


def test_state_round_trip_continues_identically():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 3))
    opt = OpenAIAdam([p], lr=1e-2, weight_decay=0.01)
    grads = [torch.randn(3, 3) for _ in range(4)]
    for g in grads[:2]:
        p.grad = g
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = OpenAIAdam([q], lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save + torch.load would
    for g in grads[2:]:
        p.grad, q.grad = g, g.clone()
        opt.step(), opt2.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("kw", [dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=0.0), dict(weight_decay=-0.1)])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        OpenAIAdam([torch.nn.Parameter(torch.zeros(2))], **kw)
