// Counter-based dropout randomness shared by the CPU kernels: Philox4x32 (Salmon et al.,
// "Parallel random numbers: as easy as 1, 2, 3", SC'11), bit-for-bit as triton.language's
// tl.philox, and the same draws as the Triton kernels in kernels/ — so a seed gives the same
// dropout mask on CPU and GPU, and a test can compare the two backends' masks.
//
// A keep decision is a pure function of (seed, element): forward and backward regenerate the
// same mask, and no mask is ever stored. The key is (seed mod 2³², seed >> 32).
//   add + LayerNorm (as tl.rand(seed, e) >= p, kernels/add_layernorm.py): 10 rounds, counter
//     (e mod 2³², e >> 32, 0, 0) with e = i·C + j the element index; word 0 → u ∈ [0, 1) by
//     Triton's uint_to_uniform_float; keep iff u ≥ p (p rounded to float32).
//   attention (kernels/attention.py): 7 rounds, counter (i, j >> 3, b·H + h, 0); its four words
//     are eight 16-bit draws, column j taking half (j & 1) (0 = low) of word (j & 7) >> 1;
//     keep iff draw ≥ round(p·2¹⁶). Eight draws per call: a fraction of the work of one call
//     per element.
#pragma once

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

// Triton's uint_to_uniform_float for 32-bit words: uniform in [0, 1).
GPT1_INLINE float uint_to_uniform_float(uint32_t r) {
  const int32_t i = static_cast<int32_t>(r);
  return float(i < 0 ? ~i : i) * 4.6566127342e-10f;  // ~i = −i − 1 without overflow
}

// add + LayerNorm dropout: the seed's key and the threshold.
struct ElementDropout {
  uint32_t k0, k1;  // Philox key: low and high words of the seed
  float p;          // drop probability, as float32
  ElementDropout(uint64_t seed, double dropout_p)
      : k0(uint32_t(seed)), k1(uint32_t(seed >> 32)), p(static_cast<float>(dropout_p)) {}
};

// 1 if element e = e_hi·2³² + e_lo is kept, else 0 (as a number: loops over e vectorise).
template <typename T>
GPT1_INLINE T element_keep(uint32_t e_lo, uint32_t e_hi, uint32_t k0, uint32_t k1, float p) {
  const uint32_t r = philox4x32<10>(e_lo, e_hi, 0, 0, k0, k1).w[0];
  return uint_to_uniform_float(r) >= p ? T(1) : T(0);
}

// Attention dropout: the seed's key and the 16-bit threshold.
struct AttentionDropout {
  uint32_t k0, k1;  // Philox key: low and high words of the seed
  int32_t thresh;   // drop iff the 16-bit draw < thresh = round(p·2¹⁶)
  AttentionDropout(uint64_t seed, double dropout_p)
      : k0(uint32_t(seed)), k1(uint32_t(seed >> 32)), thresh(int32_t(std::nearbyint(dropout_p * 65536.0))) {}
};

// keep[j − j0] ∈ {0, 1} for query i and keys j ∈ [j0, j1) of head bh = b·H + h. `draws` is
// scratch for 8·(⌊(j1−1)/8⌋ − ⌊j0/8⌋ + 1) uint16. Two loops that vectorise: the Philox calls of
// the column groups, each spread into its eight 16-bit draws in column order, then the compares.
template <typename T>
GPT1_INLINE void attention_keep_row(const AttentionDropout& d, uint32_t bh, int64_t i, int64_t j0, int64_t j1,
                                    T* __restrict keep, uint16_t* __restrict draws) {
  if (j1 <= j0) return;
  const uint32_t k0 = d.k0, k1 = d.k1;
  const int32_t thresh = d.thresh;
  const int64_t g0 = j0 >> 3, G = ((j1 - 1) >> 3) + 1 - g0;
#pragma omp simd
  for (int64_t g = 0; g < G; ++g) {
    const Philox4 r = philox4x32<7>(uint32_t(i), uint32_t(g0 + g), bh, 0, k0, k1);
    for (int k = 0; k < 8; ++k) draws[8 * g + k] = uint16_t(r.w[k >> 1] >> ((k & 1) * 16));
  }
  const uint16_t* __restrict row = draws + (j0 - 8 * g0);
#pragma omp simd
  for (int64_t j = 0; j < j1 - j0; ++j) keep[j] = int32_t(row[j]) >= thresh ? T(1) : T(0);
}

}  // namespace gpt1
