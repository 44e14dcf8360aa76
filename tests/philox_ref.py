"""The dropout draws both backends document, in numpy: the spec their masks are pinned to.

add+LayerNorm (keep_mask): keep = [16-bit half (j%8)%2 of word (j%8)//2 of Philox4x32-7(seed,
(row, col//8, 0, 0)) ≥ round(p·2¹⁶)], one Philox call per 8 consecutive columns.

attention (attention_keep_mask): 8-bit draws, 16 per call. Query i = 16a + 8h + r, key
j = 32g + 8k + 2q + e (r < 8, k < 4, q < 4, e < 2): keep = [byte 2(k%2) + e of word 2h + k//2
of Philox4x32-7(seed, (8a + r, 4g + q, b·H + h, 0)) ≥ min(round(p·2⁸), 255)].
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
            (prod2 >> np.uint64(32)) ^ c[1] ^ k0,
            prod2 & lo32,
            (prod0 >> np.uint64(32)) ^ c[3] ^ k1,
            prod0 & lo32,
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


def attention_draw(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where attention's draw of query i, key j sits: counter words (c0, c1), word 0..3, byte 0..3."""
    k = (j % 32) // 8
    return 8 * (i // 16) + i % 8, 4 * (j // 32) + (j % 8) // 2, 2 * ((i // 8) % 2) + k // 2, 2 * (k % 2) + j % 2


def attention_keep_mask(seed: int, p: float, i: np.ndarray, j: np.ndarray, bh: np.ndarray) -> np.ndarray:
    """Attention's keep decisions for query i, key j of head bh = b·H + h (8-bit draws)."""
    c0, c1, word, byte = attention_draw(i, j)
    words = philox4x32([c0, c1, bh, np.zeros_like(i)], seed)
    draw = (np.choose(word, words) >> (8 * byte).astype(np.uint64)) & np.uint64(0xFF)
    return draw >= min(round(p * 2**8), 255)
