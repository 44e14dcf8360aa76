"""The C++ extension as a whole: what it registers, and how it is built (engine/_build.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from engine import _build, ops


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    """Every test here needs the C++ kernels built from csrc/ and fails if they cannot be loaded."""
    if os.environ.get("GPT1_CPU_KERNELS", "cpp") != "cpp":
        pytest.skip("GPT1_CPU_KERNELS is not 'cpp': the CPU ops are not served by csrc/")
    error = ops.cpu_kernels_error()
    assert error is None, error


@pytest.mark.parametrize("name", sorted(ops.SCHEMAS))
def test_every_op_has_its_cpu_kernel_from_csrc(name):
    dump = torch._C._dispatch_dump(f"gpt1::{name}")
    cpu = re.search(r"^CPU: registered at (\S+):\d+ :: (.*)$", dump, re.MULTILINE)
    assert cpu, f"gpt1::{name} has no CPU kernel:\n{dump}"
    assert Path(cpu.group(1)).name == "registration.cpp", f"gpt1::{name}'s CPU kernel is not the C++ one:\n{dump}"
    assert "unboxed" in cpu.group(2)  # a typed C++ function, so its signature matched the schema


def test_build_inputs_cover_sources_and_headers():
    inputs = _build.inputs()
    assert set(_build.sources()) <= set(inputs)
    names = {Path(p).name for p in inputs}
    assert {"common.h", "philox.h", "ops.h", "registration.cpp"} <= names
    # one file per op
    assert {"attention.cpp", "add_layernorm.cpp", "linear_gelu.cpp", "linear_cross_entropy.cpp"} <= names


def test_build_flags_are_portable():
    # no -march=native: the binary may run on another machine; OpenMP for at::parallel_for
    assert not any(flag.startswith("-march") for flag in _build.CXX_FLAGS)
    assert "-fopenmp" in _build.CXX_FLAGS and "-fopenmp" in _build.LD_FLAGS


def _op_calls():
    """One small float32 call of every op (name, thunk)."""
    g = torch.Generator().manual_seed(0)
    x, r, dy = (torch.randn(6, 16, generator=g) for _ in range(3))
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    wf, bf, gyf = torch.randn(24, 16, generator=g), torch.randn(24, generator=g), torch.randn(6, 24, generator=g)
    qkv, dout = torch.randn(2, 5, 48, generator=g), torch.randn(2, 5, 16, generator=g)
    wv, targets = torch.randn(30, 16, generator=g), torch.randint(0, 30, (6,), generator=g)
    seed = torch.tensor([3])
    gpt1 = torch.ops.gpt1
    _, mean, rstd = gpt1.add_layernorm_fwd(x, r, w, b, 1e-5, 0.1, seed)
    _, pre = gpt1.linear_gelu_fwd(x, wf, bf, "tanh")
    out, lse = gpt1.attention_fwd(qkv, 2, 0.1, seed)
    return {
        "add_layernorm_fwd": lambda: gpt1.add_layernorm_fwd(x, r, w, b, 1e-5, 0.1, seed),
        "add_layernorm_bwd": lambda: gpt1.add_layernorm_bwd(dy, x, r, w, mean, rstd, 0.1, seed),
        "linear_gelu_fwd": lambda: gpt1.linear_gelu_fwd(x, wf, bf, "tanh"),
        "linear_gelu_bwd": lambda: gpt1.linear_gelu_bwd(gyf, x, wf, pre, "tanh"),
        "attention_fwd": lambda: gpt1.attention_fwd(qkv, 2, 0.1, seed),
        "attention_bwd": lambda: gpt1.attention_bwd(dout, qkv, out, lse, 2, 0.1, seed),
        "linear_cross_entropy_fwd": lambda: gpt1.linear_cross_entropy_fwd(x, wv, targets, -100, True),
    }


@pytest.mark.parametrize(
    "name",
    [
        "add_layernorm_fwd",
        "add_layernorm_bwd",
        "linear_gelu_fwd",
        "linear_gelu_bwd",
        "attention_fwd",
        "attention_bwd",
        "linear_cross_entropy_fwd",
    ],
)
def test_ops_ignore_an_enclosing_autocast(name):
    # engine.ops casts the inputs for autocast; the kernel itself must then compute in the dtypes
    # it was given, not let autocast recast the ATen ops it calls internally (at::addmm → bf16)
    call = _op_calls()[name]
    plain = call()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = call()
    for got, want in zip(under_autocast, plain):
        assert got.dtype == want.dtype and torch.equal(got, want)
