"""The backends every op test runs on (tests/ops/conftest.py's `backend` fixture, after
extension-cpp's `_test_correctness(device)`).

* ``cpp``: CPU tensors through ``torch.ops.gpt1`` / ``engine.ops``, served by the C++ kernels
  built from csrc/ (the test fails if they cannot be loaded).
* ``triton``: the Triton launchers of kernels/. On a GPU machine: CUDA tensors, dispatched to the
  launchers the way the model reaches them. Without a GPU: CPU tensors under the Triton
  interpreter (tests/conftest.py sets TRITON_INTERPRET=1), the launchers registered as the
  gpt1:: ops' CPU kernels for the test's duration (the registration GPT1_CPU_KERNELS=triton makes
  process-wide), so the same calls reach them through the same dispatcher and autograd.

Test bodies never branch on the backend: they make tensors with ``backend.tensor`` and call
the ops.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import pytest
import torch

import engine.ops

HAS_CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Backend:
    """One way the gpt1:: ops run: its name and the device its tensors live on. Both take float32,
    bfloat16 and float16; only C++ also takes float64, any head_dim and strided qkv rows (tests
    of those run on "cpp" alone, and Triton's refusals are tested by name)."""

    name: str
    device: torch.device

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """t on this backend's device (a copy, so callers may mark it requires_grad)."""
        return t.detach().to(self.device, copy=True)

    def seed(self, value: int) -> torch.Tensor:
        """A dropout seed, as engine.ops.new_seed makes it: int64 (1,) on the device."""
        return torch.tensor([value], dtype=torch.int64, device=self.device)

    def args(self, args: tuple) -> tuple:
        """An op's arguments with every tensor on the device; the string "seed" stands for a valid seed."""
        return tuple(
            self.seed(1) if a == "seed" else self.tensor(a) if isinstance(a, torch.Tensor) else a for a in args
        )


CPP = Backend("cpp", torch.device("cpu"))
TRITON = Backend("triton", torch.device("cuda" if HAS_CUDA else "cpu"))
BACKENDS = {"cpp": CPP, "triton": TRITON}


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[None]:
    """The Triton launchers as the gpt1:: ops' CPU kernels, inside the with block."""
    engine.ops.load_cpu_kernels()  # the C++ kernels first: ours stack on top and come off again
    lib = torch.library.Library("gpt1", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        for name in engine.ops.SCHEMAS:
            lib.impl(name, engine.ops._triton_launcher(name), "CPU")
    try:
        yield
    finally:
        lib._destroy()  # the dispatcher falls back to the C++ kernels


@contextlib.contextmanager
def use(name: str) -> Iterator[Backend]:
    """Backend `name`, ready: the C++ kernels loaded (the test fails if they cannot be), or the
    Triton launchers reachable (skipped where triton is not installed)."""
    be = BACKENDS[name]
    if be.name == "cpp":
        if os.environ.get("GPT1_CPU_KERNELS", "cpp") != "cpp":
            pytest.skip("GPT1_CPU_KERNELS is not 'cpp': the CPU ops are not served by csrc/")
        error = engine.ops.cpu_kernels_error()
        assert error is None, error
        yield be
        return
    pytest.importorskip("triton")
    with contextlib.nullcontext() if be.device.type == "cuda" else triton_on_cpu():
        yield be


def cases(shared: list, *, cpp: list = (), compiled: list = (), backends: tuple = tuple(BACKENDS)) -> list:
    """(backend, case) parameters: `shared` on every backend, `cpp` on the C++ kernels only (what
    Triton refuses, e.g. head_dim 24), `compiled` on C++ and on CUDA Triton but not under the
    interpreter (shapes too large for it). `backends`: the backend parameter's values."""
    out = [pytest.param(b, c, id=f"{b}-{c}") for b in backends for c in shared]
    out += [pytest.param(b, c, id=f"{b}-{c}") for b in backends if b.startswith("cpp") for c in [*cpp, *compiled]]
    if HAS_CUDA:
        out += [pytest.param(b, c, id=f"{b}-{c}") for b in backends if b.startswith("triton") for c in compiled]
    return out
