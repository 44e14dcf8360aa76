"""Micro-batches loaded ahead of the step in a background thread, and moved to the device."""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor


def to_device(batch: Any, device: torch.device) -> Any:
    """Moves every tensor in a (nested dict/list/tuple) batch; non_blocking from pinned memory."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _pin(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pin(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_pin(v) for v in batch)
    return batch


class Prefetcher:
    """Loads micro-batches in a background thread, in order, `depth` ahead of the step (and
    pins them on CUDA), so reading data overlaps compute. Yields (step, micro, batch)."""

    def __init__(
        self, jobs: Iterable[tuple[int, int, int, int]], fetch: Callable[[int, int, int], Any], depth: int, pin: bool
    ) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(jobs), fetch, pin), daemon=True, name="prefetch")
        self._thread.start()

    def _run(self, jobs: Iterator[tuple[int, int, int, int]], fetch: Callable, pin: bool) -> None:
        try:
            for step, micro, start, count in jobs:
                batch = fetch(step, start, count)
                item = (step, micro, _pin(batch) if pin else batch)
                while not self._put(item):
                    if self._stop.is_set():
                        return
        except BaseException as e:  # surfaced in the training thread by __next__
            while not self._put(e) and not self._stop.is_set():
                pass

    def _put(self, item: Any) -> bool:
        try:
            self._queue.put(item, timeout=0.1)
            return True
        except queue.Full:
            return False

    def __next__(self) -> tuple[int, int, Any]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=5)
