"""Launches on the tensors' own GPU (kernels/device.py): Triton launches on the current CUDA device,
so every launcher the gpt1:: ops reach enters its tensors' device first."""

from __future__ import annotations

import pytest
import torch

import engine.ops
from engine._kernels import kernel_module
from helpers import assert_close


def test_every_op_launcher_runs_on_its_tensors_device():
    launchers = {name: getattr(kernel_module(module), name) for name, module in engine.ops._KERNEL_MODULE.items()}
    launchers.update((f"linear_gelu candidate {k}", v) for k, v in kernel_module("linear_gelu").CANDIDATES.items())
    missing = [name for name, launcher in launchers.items() if not getattr(launcher, "on_tensor_device", False)]
    assert len(launchers) == len(engine.ops.SCHEMAS) + 2 and not missing, f"not wrapped in on_tensor_device: {missing}"


@pytest.mark.gpu_first
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_the_fused_ops_on_the_second_gpu_match_the_first():
    """A GPT-1 step's ops on cuda:1 while cuda:0 is current: the same results as on cuda:0."""
    g = torch.Generator().manual_seed(0)
    qkv, x, r = (
        torch.randn(2, 70, 96, generator=g),
        torch.randn(140, 32, generator=g),
        torch.randn(140, 32, generator=g),
    )
    w, b, h, emb = torch.randn(64, 32, generator=g), torch.randn(64, generator=g), x, torch.randn(101, 32, generator=g)
    targets = torch.randint(0, 101, (140,), generator=g)

    def step(device: str) -> list[torch.Tensor]:
        leaves = [t.to(device).requires_grad_() for t in (qkv, x, r, w, b, h, emb)]
        q, xx, rr, ww, bb, hh, ee = leaves
        with torch.cuda.device(0):
            loss = engine.ops.causal_attention(q, 2).square().mean()
            loss = (
                loss
                + engine.ops.add_layernorm(xx, rr, torch.ones(32, device=device), torch.zeros(32, device=device)).mean()
            )
            loss = loss + engine.ops.linear_gelu(xx, ww, bb).mean()
            loss = loss + engine.ops.linear_cross_entropy(hh, ee, targets.to(device))
            loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    for got, want in zip(step("cuda:1"), step("cuda:0")):
        assert_close(got.cpu(), want.cpu())
