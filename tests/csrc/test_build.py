"""The C++ extension as a whole: what it registers, and how it is built (engine/_build.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from engine import _build, ops


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
