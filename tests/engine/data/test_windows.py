"""Training and validation windows: shapes, determinism, slicing across processes, coverage."""

import numpy as np
import pytest
import torch

from engine.data.windows import RandomWindows, eval_batches, eval_starts

TOKENS = (np.arange(1000) % 65000).astype(np.uint16)  # token i == i: a window shows its offset


def test_random_windows_shape_and_alignment():
    w = RandomWindows(TOKENS, 17, batch_size=8, seed=0)
    batch = w(3, 0, 8)
    assert batch.shape == (8, 17) and batch.dtype == torch.int64
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(8, 16, dtype=torch.int64))  # contiguous
    assert int(batch.max()) <= 999


def test_random_windows_are_pure_functions_of_seed_and_step():
    a, b = RandomWindows(TOKENS, 17, 8, seed=0), RandomWindows(TOKENS, 17, 8, seed=0)
    assert torch.equal(a(5, 0, 8), b(5, 0, 8))
    assert torch.equal(a(5, 0, 8), a(5, 0, 8))  # asking again (a resumed run) reads the same
    assert not torch.equal(a(5, 0, 8), a(6, 0, 8))
    assert not torch.equal(a(5, 0, 8), RandomWindows(TOKENS, 17, 8, seed=1)(5, 0, 8))


def test_slices_partition_the_global_batch():
    w = RandomWindows(TOKENS, 17, 8, seed=0)
    full = w(2, 0, 8)
    parts = [w(2, start, 2) for start in range(0, 8, 2)]  # 2 ranks x 2 micro-batches of 2
    assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError, match="outside the batch"):
        w(2, 6, 4)


def test_offsets_cover_the_whole_array():
    w = RandomWindows(TOKENS, 17, 64, seed=0)
    starts = np.concatenate([w.offsets(s) for s in range(50)])
    assert starts.min() >= 0 and starts.max() <= len(TOKENS) - 17
    assert starts.min() < 20 and starts.max() > len(TOKENS) - 40


def test_eval_windows_predict_each_token_once():
    starts = eval_starts(100, 11)
    assert starts.tolist() == list(range(0, 90, 10))
    targets = np.concatenate([np.arange(s + 1, s + 11) for s in starts])
    assert len(targets) == len(set(targets.tolist()))  # no target predicted twice
    few = eval_starts(1000, 11, max_windows=5)
    assert len(few) == 5 and few[0] == 0 and few[-1] == eval_starts(1000, 11)[-1]


def test_eval_batches_split_across_ranks():
    one = torch.cat(list(eval_batches(TOKENS, 17, 4)))
    ranks = [torch.cat(list(eval_batches(TOKENS, 17, 4, rank=r, world_size=2))) for r in range(2)]
    assert len(ranks[0]) + len(ranks[1]) == len(one)
    assert sorted(torch.cat(ranks)[:, 0].tolist()) == sorted(one[:, 0].tolist())


def test_shorter_than_one_window():
    with pytest.raises(ValueError, match="training split has 10 tokens, shorter than one window"):
        RandomWindows(TOKENS[:10], 17, 4, seed=0)
    with pytest.raises(ValueError, match="validation split"):
        list(eval_batches(TOKENS[:10], 17, 4))


def test_uint32_tokens_read_as_uint16_ones():
    """Shards past a 65,536-token vocabulary are uint32: windows read them alike, ids intact."""
    big = TOKENS.astype(np.uint32) + 70_000
    batch = RandomWindows(big, 17, 8, seed=0)(3, 0, 8)
    assert torch.equal(batch, RandomWindows(TOKENS, 17, 8, seed=0)(3, 0, 8) + 70_000)
    assert torch.equal(torch.cat(list(eval_batches(big, 17, 4))), torch.cat(list(eval_batches(TOKENS, 17, 4))) + 70_000)


def test_epoch_windows_visit_every_window_once_per_epoch():
    from engine.data.windows import EpochWindows, eval_starts

    tokens = np.arange(1000, dtype=np.uint16)
    w = EpochWindows(tokens, window=9, batch_size=4, seed=3)
    n = w.windows_per_epoch
    assert n == len(eval_starts(1000, 9))
    steps = w.steps(2)
    seen = torch.cat([w(s, 0, 4) for s in range(steps)])[: 2 * n, 0].tolist()
    first, second = seen[:n], seen[n:]
    assert sorted(first) == sorted(second) == sorted(eval_starts(1000, 9).tolist())  # each window once per epoch
    assert first != second  # a new permutation each epoch
    # a pure function of (step, slice): any slice of any update, in any order, is the same
    assert torch.equal(w(5, 1, 2), w(5, 0, 4)[1:3])
    again = EpochWindows(tokens, window=9, batch_size=4, seed=3)
    assert torch.equal(again(steps - 1, 0, 4), w(steps - 1, 0, 4))
    assert not torch.equal(EpochWindows(tokens, 9, 4, seed=4)(0, 0, 4), w(0, 0, 4))
