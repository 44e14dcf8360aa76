"""The C++ CPU kernels under test: every test here runs the gpt1:: ops on CPU through the
extension built from csrc/ (engine.ops.load_cpu_kernels), and fails if it cannot be loaded."""
import os

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

import engine.ops


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels():
    if os.environ.get("GPT1_CPU_KERNELS", "cpp") != "cpp":
        pytest.skip("GPT1_CPU_KERNELS is not 'cpp': the CPU ops are served by Triton, not csrc/")
    error = engine.ops.cpu_kernels_error()
    assert error is None, error


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "gpt1":
            self.names.append(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))


@pytest.fixture
def gpt1_ops_run_by():
    """gpt1_ops_run_by(fn) runs fn() and returns the gpt1:: ops it dispatched, in order."""

    def run(fn):
        with _Recorder() as rec:
            fn()
        return rec.names

    return run
