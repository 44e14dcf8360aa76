// Counter-based dropout randomness shared by the CPU kernels: Philox4x32 (Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3", SC'11), bit-for-bit as triton.language's
// tl.philox, and the same draws as the Triton kernels in kernels/ — so a seed gives the same
// dropout mask on CPU and GPU, and a test can compare the two backends' masks.
//
// A keep decision is a pure function of (seed, element): forward and backward regenerate the
// same mask, and no mask is ever stored. Key (seed mod 2³², seed >> 32), 7 rounds.
//   add + LayerNorm (keep_row, as kernels/philox.py's draws16): counter (i, j >> 3, 0, 0)
//     for row i, column j of the (N, C) rows (N ≤ 2³², C ≤ 2³⁵: distinct counters); the four
//     words are eight 16-bit draws, column j taking half (j & 1) (0 = low) of word (j & 7) >> 1;
//     keep iff draw ≥ round(p·2¹⁶).
//   attention (attention_keep_row, as kernels/attention.py's _dropout_keep): sixteen 8-bit draws
//     per call, laid out as one thread of the GPU's wgmma accumulator holds them. Query
//     i = 16a + 8h + r, key j = 32g + 8k + 2q + e (r < 8, k < 4, q < 4, e < 2): counter
//     (8a + r, 4g + q, b·H + h, 0), byte 2(k & 1) + e of word 2h + (k >> 1); keep iff
//     byte ≥ min(round(p·2⁸), 255).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"

namespace gpt1 {

struct Philox4 {
  uint32_t w[4];
};

// Philox4x32 with `Rounds` rounds on counter (c0, c1, c2, c3), key (k0, k1).
template <int Rounds>
GPT1_INLINE Philox4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#pragma GCC unroll 10
  for (int round = 0; round < Rounds; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;  // round multipliers
    const uint64_t p2 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p2 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p2);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;  // key schedule (Weyl sequence)
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// A dropout's Philox key and 16-bit threshold.
struct Dropout16 {
  uint32_t k0, k1;  // Philox key: low and high words of the seed
  int32_t thresh;   // drop iff the 16-bit draw < thresh = round(p·2¹⁶)
  Dropout16(uint64_t seed, double dropout_p)
      : k0(uint32_t(seed)), k1(uint32_t(seed >> 32)), thresh(int32_t(std::nearbyint(dropout_p * 65536.0))) {}
};

// A dropout's Philox key and 8-bit threshold (attention).
struct Dropout8 {
  uint32_t k0, k1;  // Philox key: low and high words of the seed
  int32_t thresh;   // drop iff the 8-bit draw < thresh = min(round(p·2⁸), 255)
  Dropout8(uint64_t seed, double dropout_p)
      : k0(uint32_t(seed)), k1(uint32_t(seed >> 32)),
        thresh(int32_t(std::min(std::nearbyint(dropout_p * 256.0), 255.0))) {}
};

// Attention's keep[j − j0] ∈ {0, kept} for query i, keys j ∈ [j0, j1) of head bh. `draws` is
// scratch for 32·(⌊(j1−1)/32⌋ − ⌊j0/32⌋ + 1) bytes. A row reads two of each call's four words
// (the other two are row i ± 8's), so on CPU a call yields 8 draws, as keep_row's do.
template <typename T>
GPT1_INLINE void attention_keep_row(const Dropout8& d, uint32_t bh, int64_t i, int64_t j0, int64_t j1,
                                    T* __restrict keep, uint8_t* __restrict draws, T kept = T(1)) {
  if (j1 <= j0) return;
  constexpr int64_t kChunk = 64;  // calls per chunk (a multiple of 4: whole 32-column groups)
  const uint32_t k0 = d.k0, k1 = d.k1, c0 = uint32_t(8 * (i >> 4) + (i & 7));
  const bool upper = (i >> 3) & 1;  // this row reads words 2h, 2h + 1 with h = (i / 8) % 2
  const int64_t first = 4 * (j0 >> 5), n_calls = 4 * (((j1 - 1) >> 5) + 1) - first;
  uint32_t wa[kChunk], wb[kChunk];
  for (int64_t c = 0; c < n_calls; c += kChunk) {
    const int64_t n = std::min(kChunk, n_calls - c);
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) {
      const Philox4 r = philox4x32<7>(c0, uint32_t(first + c + t), bh, 0, k0, k1);
      wa[t] = upper ? r.w[2] : r.w[0];
      wb[t] = upper ? r.w[3] : r.w[1];
    }
    uint8_t* __restrict out = draws + 8 * c;  // 32 columns per 4 calls
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) {  // call 4g + q: column 32g + 8k + 2q + e, byte 2(k & 1) + e
      const int64_t at = 32 * (t >> 2) + 2 * (t & 3);
      out[at + 0] = uint8_t(wa[t]);
      out[at + 1] = uint8_t(wa[t] >> 8);
      out[at + 8] = uint8_t(wa[t] >> 16);
      out[at + 9] = uint8_t(wa[t] >> 24);
      out[at + 16] = uint8_t(wb[t]);
      out[at + 17] = uint8_t(wb[t] >> 8);
      out[at + 24] = uint8_t(wb[t] >> 16);
      out[at + 25] = uint8_t(wb[t] >> 24);
    }
  }
  const uint8_t* __restrict row = draws + (j0 - 32 * (j0 >> 5));
  const int32_t thresh = d.thresh;
#pragma omp simd
  for (int64_t j = 0; j < j1 - j0; ++j) keep[j] = int32_t(row[j]) >= thresh ? kept : T(0);
}

// keep[j − j0] ∈ {0, kept} (kept where the element survives) for row i, columns j ∈ [j0, j1) and
// counter word c2. `draws` is scratch for 8·(⌊(j1−1)/8⌋ − ⌊j0/8⌋ + 1) uint16. Three loops that
// vectorise, over chunks of column groups: the Philox calls, into one stack array per word
// (structure of arrays: GCC vectorises a call per lane); their eight 16-bit halves spread into
// `draws` in column order; then, for the whole row, the compares.
template <typename T>
GPT1_INLINE void keep_row(const Dropout16& d, uint32_t c2, int64_t i, int64_t j0, int64_t j1, T* __restrict keep,
                          uint16_t* __restrict draws, T kept = T(1)) {
  if (j1 <= j0) return;
  constexpr int64_t kChunk = 64;  // column groups per chunk: 1 KiB of words on the stack
  const uint32_t k0 = d.k0, k1 = d.k1;
  const int64_t g0 = j0 >> 3, G = ((j1 - 1) >> 3) + 1 - g0;
  uint32_t w0[kChunk], w1[kChunk], w2[kChunk], w3[kChunk];
  for (int64_t c = 0; c < G; c += kChunk) {
    const int64_t n = std::min(kChunk, G - c);
#pragma omp simd
    for (int64_t g = 0; g < n; ++g) {
      const Philox4 r = philox4x32<7>(uint32_t(i), uint32_t(g0 + c + g), c2, 0, k0, k1);
      w0[g] = r.w[0];
      w1[g] = r.w[1];
      w2[g] = r.w[2];
      w3[g] = r.w[3];
    }
    uint16_t* __restrict out = draws + 8 * c;
#pragma omp simd
    for (int64_t g = 0; g < n; ++g) {  // column 8g + k takes half k % 2 (0: low) of word k / 2
      out[8 * g + 0] = uint16_t(w0[g]);
      out[8 * g + 1] = uint16_t(w0[g] >> 16);
      out[8 * g + 2] = uint16_t(w1[g]);
      out[8 * g + 3] = uint16_t(w1[g] >> 16);
      out[8 * g + 4] = uint16_t(w2[g]);
      out[8 * g + 5] = uint16_t(w2[g] >> 16);
      out[8 * g + 6] = uint16_t(w3[g]);
      out[8 * g + 7] = uint16_t(w3[g] >> 16);
    }
  }
  const uint16_t* __restrict row = draws + (j0 - 8 * g0);
  const int32_t thresh = d.thresh;
#pragma omp simd
  for (int64_t j = 0; j < j1 - j0; ++j) keep[j] = int32_t(row[j]) >= thresh ? kept : T(0);
}

}  // namespace gpt1
