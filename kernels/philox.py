"""Philox4x32-7 for the dropout of both fused kernels (attention, add+LayerNorm), in one place.

Counter-based (Salmon et al., SC'11): a keep decision is a pure function of (seed, counter), so
forward and backward regenerate the same mask and none is stored; seven rounds pass BigCrush.
Key = (seed mod 2³², seed >> 32). csrc/philox.h draws the same bits on the CPU and
tests/philox_ref.py is the NumPy spec both are tested against. Each kernel lays out its own
counters and draws (attention: 8-bit, 16 per call; add+LayerNorm: 16-bit, 8 per call).
"""
from __future__ import annotations

import triton
import triton.language as tl

PHILOX_ROUNDS: tl.constexpr = tl.constexpr(7)


@triton.jit
def philox(seed, c0, c1, c2):
    """tl.philox(seed, c0, c1, c2, 0, PHILOX_ROUNDS) bit for bit, each round's two products taken as
    32×32 → 64-bit multiplies: one wide multiply (IMAD.WIDE) each instead of a high and a low one."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = c0.to(tl.uint32, bitcast=True)
    c1 = c1.to(tl.uint32, bitcast=True)
    c2 = c2.to(tl.uint32, bitcast=True)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(PHILOX_ROUNDS):
        p0 = c0.to(tl.uint64) * 0xD2511F53
        p2 = c2.to(tl.uint64) * 0xCD9E8D57
        c0, c2 = (p2 >> 32).to(tl.uint32) ^ c1 ^ k0, (p0 >> 32).to(tl.uint32) ^ c3 ^ k1
        c1, c3 = p2.to(tl.uint32), p0.to(tl.uint32)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def draws16(seed, c2, offs_m, start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """16-bit draws (int32 in [0, 2¹⁶)) of rows offs_m × columns start_n + [0, BLOCK_N) with counter
    word 2 = c2; start_n and BLOCK_N are multiples of 8. Draw (i, j) is 16-bit half (j % 8) % 2
    (0: low) of word (j % 8) // 2 of Philox4x32-7(key = seed, counter = (i, j // 8, c2, 0))."""
    GROUPS: tl.constexpr = BLOCK_N // 8
    zero = tl.zeros((BLOCK_M, GROUPS), dtype=tl.int32)
    c0 = offs_m[:, None] + zero  # row i
    c1 = (start_n // 8 + tl.arange(0, GROUPS))[None, :] + zero  # column group j // 8
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2 + zero, zero, PHILOX_ROUNDS)
    v0 = (r0 & 0xFFFF).to(tl.int32)
    v1 = (r0 >> 16).to(tl.int32)
    v2 = (r1 & 0xFFFF).to(tl.int32)
    v3 = (r1 >> 16).to(tl.int32)
    v4 = (r2 & 0xFFFF).to(tl.int32)
    v5 = (r2 >> 16).to(tl.int32)
    v6 = (r3 & 0xFFFF).to(tl.int32)
    v7 = (r3 >> 16).to(tl.int32)
    # Interleave to column 8·g + k, k = 4x + 2y + z: each join appends the next-faster axis.
    a00 = tl.join(v0, v4)  # (M, G, 2) over x
    a01 = tl.join(v1, v5)
    a10 = tl.join(v2, v6)
    a11 = tl.join(v3, v7)
    b0 = tl.join(a00, a10)  # (M, G, 2, 2) over x, y
    b1 = tl.join(a01, a11)
    return tl.reshape(tl.join(b0, b1), (BLOCK_M, BLOCK_N))  # (M, G, 2, 2, 2) → (M, N)
