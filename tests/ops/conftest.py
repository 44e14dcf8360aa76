"""The `backend` fixture (tests/backends.py says what each backend is), a dispatch recorder, and the
markers bench/gpu_check.py selects the GPU's test run by."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from backends import BACKENDS, Backend, use

MARKERS = {
    "gpu_first": "what a GPU can get wrong and the interpreter cannot show (bit-exact dropout draws, "
    "every autotune config, the GPU's launch constants): bench/gpu_check.py runs these first",
    "offline": "compiles for sm_90a without a GPU (Triton's bundled ptxas): nothing to learn on a GPU",
    "cpp": "needs the C++ CPU kernels built from csrc/ (the cpp backend): CI's, not the GPU's",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    # triton 3.6's interpreter int()s 1-element arrays for runtime loop bounds (numpy < 2.4 only warns)
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test run on the cpp backend is marked cpp, however it got the backend."""
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("backend") == "cpp":
            item.add_marker(pytest.mark.cpp)


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> Iterator[Backend]:
    """Each op test once per backend; parametrize("backend", [...], indirect=True) narrows it."""
    with use(request.param) as be:
        yield be


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    """fp32 means fp32: the launchers' own torch matmuls (cuBLAS addmm, the LM head's GEMMs) without
    TF32, whatever an earlier test (a CUDA training run) switched on."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "gpt1":
            self.names.append(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))


@pytest.fixture
def gpt1_ops_run_by():
    """gpt1_ops_run_by(fn) runs fn() and returns the gpt1:: ops it dispatched, in order."""

    def run(fn) -> list[str]:
        with _Recorder() as rec:
            fn()
        return rec.names

    return run
