"""(n_ctx + 1)-token windows over a token array: random ones to train on, fixed ones to validate.

A window of seq_len + 1 tokens gives inputs w[:-1] and aligned targets w[1:]
(``GPT1(ids, targets=...)``). Training windows are a pure function of (seed, update,
sample index), so any process can produce any slice of any update's batch: processes read
different slices of the same global batch, and a resumed run reads exactly what the
interrupted one would have.
"""

from __future__ import annotations

import errno
from typing import Iterator

import numpy as np
import torch
from torch import Tensor


def check_length(tokens: np.ndarray, window: int, split: str) -> None:
    if len(tokens) < window:
        raise ValueError(
            f"the {split} split has {len(tokens)} tokens, shorter than one window "
            f"(seq_len + 1 = {window} tokens): use more text or a smaller --seq-len"
        )


def gather(tokens: np.ndarray, starts: np.ndarray, window: int, vocab_size: int | None = None) -> Tensor:
    """(len(starts), window) int64 tensor of tokens[s : s + window] for each start. An id of
    `vocab_size` or more is an OSError naming the shard file and offset: the file changed after
    it was opened (opening a cache entry checks its bytes, engine.data.integrity)."""
    idx = starts[:, None] + np.arange(window)[None, :]
    batch = np.asarray(tokens[idx], dtype=np.int64)
    if vocab_size is not None and batch.size and batch.max() >= vocab_size:
        at = int(idx.flat[np.argmax(batch >= vocab_size)])
        raise OSError(
            errno.EIO,
            f"token id {int(tokens[at])} at token {at:,} (byte {at * tokens.itemsize:,}) is outside the "
            f"vocabulary of {vocab_size}: the file changed after the run opened it; rerun the command "
            "(opening the cache checks every shard and rebuilds a damaged one)",
            str(tokens.filename) if getattr(tokens, "filename", None) else None,
        )
    return torch.from_numpy(batch)


class RandomWindows:
    """Training batches: sample j of update `step` starts at the j-th of `batch_size` offsets
    drawn uniformly from [0, len - window] by PCG64 seeded with (seed, step).

    Called as ``windows(step, start, count)`` (engine.training.trainer's BatchFn): samples
    [start, start + count) of that update, shape (count, window). `vocab_size`: ids at or past
    it are an error naming the file (see gather)."""

    def __init__(self, tokens: np.ndarray, window: int, batch_size: int, seed: int, vocab_size: int | None = None):
        check_length(tokens, window, "training")
        self.tokens, self.window, self.batch_size, self.seed = tokens, window, batch_size, seed
        self.vocab_size = vocab_size

    def offsets(self, step: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))
        return rng.integers(0, len(self.tokens) - self.window + 1, size=self.batch_size)

    def __call__(self, step: int, start: int, count: int) -> Tensor:
        if start < 0 or count < 0 or start + count > self.batch_size:
            raise ValueError(f"samples [{start}, {start + count}) outside the batch of {self.batch_size}")
        return gather(self.tokens, self.offsets(step)[start : start + count], self.window, self.vocab_size)


class EpochWindows:
    """Training batches in epochs (the paper trains 100 epochs): the split is cut into the
    windows of `eval_starts` (each token predicted once per epoch), and epoch e visits all of
    them once in the order of a PCG64 permutation seeded with (seed, e). Sample i of the run
    (update i // batch_size) is window perm_e[i mod n] of epoch e = i // n: a pure function of
    (step, sample), so resuming mid-epoch reads exactly what the interrupted run would have."""

    def __init__(self, tokens: np.ndarray, window: int, batch_size: int, seed: int, vocab_size: int | None = None):
        check_length(tokens, window, "training")
        self.tokens, self.window, self.batch_size, self.seed = tokens, window, batch_size, seed
        self.vocab_size = vocab_size
        self.starts = eval_starts(len(tokens), window)
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def windows_per_epoch(self) -> int:
        return len(self.starts)

    def steps(self, epochs: float) -> int:
        """Updates that cover `epochs` passes (the last batch may reach into the next epoch)."""
        return max(1, int(np.ceil(epochs * len(self.starts) / self.batch_size)))

    def order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perm = (epoch, rng.permutation(len(self.starts)))
        return self._perm[1]

    def __call__(self, step: int, start: int, count: int) -> Tensor:
        if start < 0 or count < 0 or start + count > self.batch_size:
            raise ValueError(f"samples [{start}, {start + count}) outside the batch of {self.batch_size}")
        n = len(self.starts)
        idx = np.arange(step * self.batch_size + start, step * self.batch_size + start + count)
        picked = np.empty(count, dtype=np.int64)
        for epoch in np.unique(idx // n):
            here = idx // n == epoch
            picked[here] = self.starts[self.order(int(epoch))[idx[here] % n]]
        return gather(self.tokens, picked, self.window, self.vocab_size)


def eval_starts(n_tokens: int, window: int, max_windows: int | None = None) -> np.ndarray:
    """Starts of non-overlapping windows that share one token (stride window - 1), so each
    token is predicted once; `max_windows` of them spread evenly over the split if given."""
    starts = np.arange(0, n_tokens - window + 1, window - 1)
    if max_windows is not None and len(starts) > max_windows:
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).round().astype(np.int64)]
    return starts


def eval_batches(
    tokens: np.ndarray,
    window: int,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_windows: int | None = None,
    vocab_size: int | None = None,
) -> Iterator[Tensor]:
    """Validation batches (batch_size, window): process `rank` takes every world_size-th
    window of `eval_starts`, so processes together cover each window once."""
    check_length(tokens, window, "validation")
    starts = eval_starts(len(tokens), window, max_windows)[rank::world_size]
    for i in range(0, len(starts), batch_size):
        yield gather(tokens, starts[i : i + batch_size], window, vocab_size)
