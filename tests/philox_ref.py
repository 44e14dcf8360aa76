"""The dropout draw both backends document, in numpy: the spec their masks are pinned to.

keep = [16-bit half (j%8)%2 of word (j%8)//2 of Philox4x32-7(seed, counter) ≥ round(p·2¹⁶)],
one Philox call per 8 consecutive columns j. Counters: attention (i, j//8, b·H + h, 0);
add+LayerNorm (row, col//8, 0, 0).
"""
from __future__ import annotations

import numpy as np


def philox4x32(counters: list[np.ndarray], seed: int, rounds: int = 7) -> list[np.ndarray]:
    """Philox4x32 (Salmon et al., SC'11) in numpy: key = (seed low word, seed high word)."""
    c = [x.astype(np.uint64) for x in counters]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    lo32 = np.uint64(0xFFFFFFFF)
    for _ in range(rounds):
        prod0 = np.uint64(0xD2511F53) * c[0]
        prod2 = np.uint64(0xCD9E8D57) * c[2]
        c = [
            (prod2 >> np.uint64(32)) ^ c[1] ^ k0, prod2 & lo32,
            (prod0 >> np.uint64(32)) ^ c[3] ^ k1, prod0 & lo32,
        ]
        k0 = (k0 + np.uint64(0x9E3779B9)) & lo32
        k1 = (k1 + np.uint64(0xBB67AE85)) & lo32
    return c


def keep_mask(seed: int, p: float, i: np.ndarray, j: np.ndarray, stream: np.ndarray) -> np.ndarray:
    """Keep decisions for elements (i, j) with the third counter word `stream`."""
    words = philox4x32([i, j // 8, stream, np.zeros_like(i)], seed)
    word = np.choose((j % 8) // 2, words)
    draw = np.where(j % 2 == 0, word & np.uint64(0xFFFF), word >> np.uint64(16))
    return draw >= round(p * 2**16)
