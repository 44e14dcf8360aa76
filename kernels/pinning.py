"""Pinning an autotuned kernel to one of its configs, for tests: on CUDA the autotuner runs only
its pick and under the interpreter each launcher runs one fixed tile, so without this the other
configs would never be checked for correctness (tests/ops runs every config this way)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import triton

_PINNED: dict = {}  # JITFunction → the triton.Config its launches run


@contextlib.contextmanager
def pinned_config(tuned, config: triton.Config) -> Iterator[None]:
    """Within the block, launches of `tuned`'s kernel run `config` (one of tuned.configs),
    neither the autotuner's pick nor the interpreter's fixed tile."""
    if config not in tuned.configs:
        raise ValueError(f"pinned_config: {config} is not one of {tuned.fn.__name__}'s configs")
    _PINNED[tuned.fn] = config
    try:
        yield
    finally:
        del _PINNED[tuned.fn]


def pinned(kernel) -> tuple[dict, dict] | None:
    """(the pinned config's constexprs, its launch options) for `kernel`, or None."""
    config = _PINNED.get(kernel)
    if config is None:
        return None
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg:
        options["maxnreg"] = config.maxnreg
    return dict(config.kwargs), options
