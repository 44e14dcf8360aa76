"""Attention dropout's draw scheme, one spec (tests/philox_ref.py's attention_keep_mask) and its
implementations: kernels/attention.py's _dropout_keep (on kernels/philox.py's philox) and csrc/philox.h's
attention_keep_row. Plus the property the scheme exists for: each Philox call's 16 draws are
score elements that one thread of the sm_90 wgmma accumulator holds, so the compiled kernels
build the mask without a layout conversion (checked on the sm_90a compile, no GPU needed)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from backends import TRITON
from gpt1_kernels.attention import _check_dropout, _dropout_keep, _dropout_keep_bits, _dropout_keep_unpack
from gpt1_kernels.philox import PHILOX_ROUNDS, philox
from helpers import compile_for_sm90
from philox_ref import attention_draw, attention_keep_mask, philox4x32


def seed_tensor(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


def wgmma_owner(i: np.ndarray, j: np.ndarray, warps: int) -> tuple[np.ndarray, np.ndarray]:
    """(warp, lane) holding accumulator element (i, j) of a tile whose warps are stacked along M
    (sm_90 wgmma, m64nNk16 per warpgroup): lane 4·(i % 8) + (j % 8) // 2 of warp (i // 16) % warps."""
    return (i // 16) % warps, 4 * (i % 8) + (j % 8) // 2


@pytest.mark.parametrize("block_m,block_n,warps", [(16, 32, 4), (64, 64, 4), (128, 64, 8), (128, 32, 4), (32, 128, 8)])
def test_each_call_lands_in_one_accumulator_thread(block_m, block_n, warps):
    """Over a tile at an aligned offset, the 16 elements of every Philox call share one (warp,
    lane) and read 16 distinct bytes: no draw is moved between threads, none is used twice."""
    i, j = np.meshgrid(np.arange(block_m) + 3 * block_m, np.arange(block_n) + 5 * block_n, indexing="ij")
    c0, c1, word, byte = attention_draw(i, j)
    warp, lane = wgmma_owner(i, j, warps)
    calls: dict[tuple[int, int], set] = {}
    for key, owner, slot in zip(zip(c0.flat, c1.flat), zip(warp.flat, lane.flat), zip(word.flat, byte.flat)):
        entry = calls.setdefault(key, {"owners": set(), "slots": []})
        entry["owners"].add(owner)
        entry["slots"].append(slot)
    assert len(calls) == block_m * block_n // 16
    for key, entry in calls.items():
        assert len(entry["owners"]) == 1, f"call {key} spans threads {entry['owners']}"
        assert sorted(entry["slots"]) == [(w, y) for w in range(4) for y in range(4)], f"call {key}"


@triton.jit
def _both_philox(seed_ptr, c_ptr, out_ptr, N: tl.constexpr):
    """out[0:4] = philox's four words, out[4:8] = tl.philox's, for N counters (c0, c1, c2, 0)."""
    offs = tl.arange(0, N)
    c0, c1, c2 = tl.load(c_ptr + offs), tl.load(c_ptr + N + offs), tl.load(c_ptr + 2 * N + offs)
    seed = tl.load(seed_ptr)
    ours = philox(seed, c0, c1, c2)
    theirs = tl.philox(seed, c0, c1, c2, tl.zeros_like(c0), PHILOX_ROUNDS)
    for w in tl.static_range(4):
        tl.store(out_ptr + w * N + offs, ours[w].to(tl.int32, bitcast=True))
        tl.store(out_ptr + (4 + w) * N + offs, theirs[w].to(tl.int32, bitcast=True))


@pytest.mark.gpu_first
def test_philox_matches_tl_philox_and_numpy():
    """philox (wide multiplies) is Philox4x32-7 bit for bit: tl.philox and the numpy reference,
    on counters with the top bit set (uint32 handling) and a seed above 2³²."""
    n, seed = 64, 2**47 + 3141592653
    counters = torch.randint(-(2**31), 2**31, (3, n), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    out = torch.empty(8, n, dtype=torch.int32, device=TRITON.device)
    _both_philox[(1,)](TRITON.seed(seed), TRITON.tensor(counters.to(torch.int32).contiguous()), out, N=n)
    words = out.cpu().numpy().view(np.uint32).astype(np.uint64)
    expected = philox4x32([c.numpy().astype(np.uint32) for c in counters] + [np.zeros(n, np.uint32)], seed)
    for w in range(4):
        assert np.array_equal(words[w], words[4 + w]), f"word {w}: philox != tl.philox"
        assert np.array_equal(words[w], expected[w]), f"word {w}: philox != numpy"


@pytest.mark.cpp
@pytest.mark.parametrize("B,H,T,p,seed", [(1, 1, 1, 0.5, 9), (2, 3, 37, 0.1, 2**62 - 1), (1, 2, 70, 0.9, 2**33 + 5)])
def test_cpu_mask_is_the_numpy_spec(B, H, T, p, seed):
    """csrc/philox.h's attention_keep_row (through gpt1::attention_dropout_mask) draws exactly
    the documented mask; T = 1 and T not a multiple of 32 (rows start and end mid-call)."""
    from engine import ops

    error = ops.cpu_kernels_error()
    assert error is None, error
    keep = torch.ops.gpt1.attention_dropout_mask(seed_tensor(seed), B, H, T, p).numpy()
    bh, i, j = np.meshgrid(np.arange(B * H), np.arange(T), np.arange(T), indexing="ij")
    assert np.array_equal(keep, attention_keep_mask(seed, p, i, j, bh).reshape(B, H, T, T))


@triton.jit
def _both_keeps(seed_ptr, out_ptr, start_m, start_n, drop_thresh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[0] = _dropout_keep's tile, out[1] = the same tile through dK/dV's packed keep bits."""
    seed = tl.load(seed_ptr)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    direct = _dropout_keep(seed, 5, start_m, start_n, drop_thresh, BLOCK_M, BLOCK_N)
    bits = _dropout_keep_bits(seed, 5, start_m, start_n, drop_thresh, BLOCK_M, BLOCK_N)
    tl.store(out_ptr + offs, direct.to(tl.int8))
    tl.store(out_ptr + BLOCK_M * BLOCK_N + offs, _dropout_keep_unpack(bits, BLOCK_M, BLOCK_N).to(tl.int8))


@pytest.mark.gpu_first
@pytest.mark.parametrize("thresh", [1, 26, 127, 128, 129, 230, 255])
def test_packed_keep_bits_are_the_mask(thresh):
    """dK/dV's path (four byte compares per word, 16 keep bits per call, unpacked per element) is
    _dropout_keep bit for bit, for thresholds below 128 (keep = either msb) and from 128 up (both):
    the SWAR compare's two cases and its borrow-free subtraction."""
    out = torch.empty(2, 32, 64, dtype=torch.int8, device=TRITON.device)
    _both_keeps[(1,)](TRITON.seed(2**40 + 77), out, 48, 96, thresh, BLOCK_M=32, BLOCK_N=64)
    direct, packed = out.cpu()
    assert 0 < direct.sum() < direct.numel()
    assert torch.equal(direct, packed), f"{(direct != packed).sum()} of {direct.numel()} differ"


def test_threshold_is_eight_bits():
    """drop iff byte < min(round(p·2⁸), 255): p = 0.1 drops bytes 0..25; p close to 1 keeps the
    bytes equal to 255, so a p < 1 never drops everything."""
    seed = seed_tensor(1)
    assert _check_dropout("t", 0.1, seed, seed.device)[1] == 26
    assert _check_dropout("t", 0.999, seed, seed.device)[1] == 255


_LAYOUT_SM90 = r"""
from bench.attn_layout_probe import KERNELS, probe
for name, m, n in (("fwd", 128, 64), ("dq", 128, 32), ("dkdv", 32, 128)):  # the issue's configs, all w8
    shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.maxnreg)  # noqa: E731
    config = next(c for c in KERNELS[name].configs if shape(c) == (m, n, 8, None))
    off, on = probe(name, config, False), probe(name, config, True)
    print(name, *(r[k] for k in ("cvt", "loop_bar", "loop_smem", "loop") for r in (off, on)))
"""
# dK/dV's one shared-memory conversion per iteration: the packed keep words (one per Philox call)
# written once and read by the four threads of the transposed tile that hold part of each call
DKDV_EXTRA = {"bar": 1, "smem": 6}


@pytest.mark.offline
def test_dropout_needs_no_layout_round_trip_on_sm90():
    """Compiled for sm_90a (bundled ptxas, no GPU): with dropout, the inner loops of fwd and dQ
    have no more bar.sync and no more shared-memory loads/stores than without, and at most 1.5×
    the instructions (measured 1.48× / 1.46×; the old scheme's shared-memory round trip made it
    2.4× / 2.5×, with 9 more bar.sync per iteration). dK/dV, whose transposed tile cannot own a
    call's draws, moves one packed word per call: one more bar.sync (the old scheme: 9 more, its
    mask moved as 32-bit words per element) and 1.43×. The forward also has no more TTGIR
    convert_layout; dQ's 128×32 tile gains four that convert between equivalent layouts (the same
    register/lane/warp bases, spelled blocked and linear) and lower to nothing, which the loop's
    unchanged barrier and shared-memory counts confirm."""
    out = compile_for_sm90(_LAYOUT_SM90)
    lines = [line.split() for line in out.splitlines() if re.match(r"(fwd|dq|dkdv) ", line)]
    rows = {line[0]: [int(x) for x in line[1:]] for line in lines}
    assert sorted(rows) == ["dkdv", "dq", "fwd"], out
    for name, (cvt_off, cvt_on, bar_off, bar_on, smem_off, smem_on, loop_off, loop_on) in rows.items():
        extra = DKDV_EXTRA if name == "dkdv" else {"bar": 0, "smem": 0}
        assert bar_on <= bar_off + extra["bar"], f"{name}: bar.sync per iteration {bar_off} -> {bar_on} with dropout"
        assert smem_on <= smem_off + extra["smem"], (
            f"{name}: shared-memory ops per iteration {smem_off} -> {smem_on} with dropout"
        )
        assert loop_on <= 1.5 * loop_off, f"{name}: inner loop {loop_off} -> {loop_on} instructions"
    assert rows["fwd"][1] <= rows["fwd"][0], f"fwd: convert_layout {rows['fwd'][0]} -> {rows['fwd'][1]}"


def test_register_capped_config_is_tuned_only_with_dropout():
    """The forward's 128-register config exists for dropout's RNG state; without dropout it is
    its uncapped twin, so the autotuner must not time it twice."""
    from gpt1_kernels.attention import _fwd_tuned, _prune

    configs = _fwd_tuned.configs
    capped = [c for c in configs if c.maxnreg]
    assert [c.maxnreg for c in capped] == [128]
    assert capped[0] in _prune(configs, {"T_BUCKET": 512}, HAS_DROPOUT=True)
    assert capped[0] not in _prune(configs, {"T_BUCKET": 512}, HAS_DROPOUT=False)
    assert len(_prune(configs, {"T_BUCKET": 512}, HAS_DROPOUT=False)) == len(configs) - 2  # less the fp32 tile too


def test_fp32_runs_its_one_clean_tile_and_low_precision_never_does():
    """fp32 (the exact path) spills in the bf16 tiles on sm_90a: each kernel has one small tile
    for it, and only fp32 gets it."""
    from gpt1_kernels.attention import _dkdv_tuned, _dq_tuned, _fwd_tuned, _prune

    for tuner in (_fwd_tuned, _dkdv_tuned, _dq_tuned):
        fp32 = _prune(
            tuner.configs, {"T_BUCKET": 512, "qkv_ptr": torch.empty(0, dtype=torch.float32)}, HAS_DROPOUT=True
        )
        assert len(fp32) == 1 and fp32[0].kwargs["BLOCK_M"] * fp32[0].kwargs["BLOCK_N"] <= 32 * 32
        for dtype in (torch.bfloat16, torch.float16):
            lowp = _prune(tuner.configs, {"T_BUCKET": 512, "qkv_ptr": torch.empty(0, dtype=dtype)}, HAS_DROPOUT=True)
            assert fp32[0] not in lowp and len(lowp) == len(tuner.configs) - 1
