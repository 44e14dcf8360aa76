"""Launching on the tensors' own GPU: Triton launches on the current CUDA device (and stream), so a
launcher called with tensors on cuda:1 while the current device is cuda:0 would run its kernels on
the wrong GPU. Every public launcher of kernels/ is wrapped in on_tensor_device."""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def on_tensor_device(launcher: F) -> F:
    """launcher(*args) inside torch.cuda.device(the first tensor argument's device) when that is a GPU."""

    @functools.wraps(launcher)
    def run(*args: Any, **kwargs: Any) -> Any:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or not first.is_cuda:
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    run.on_tensor_device = True  # what tests/ops checks every launcher for
    return run  # type: ignore[return-value]
