"""The `backend` fixture (tests/backends.py says what each backend is) and a dispatch recorder."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from backends import BACKENDS, Backend, use


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
