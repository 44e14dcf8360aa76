"""Fused causal attention over the packed QKV projection, with attention-probability dropout.

Spec: engine/model/reference.py::causal_attention. Per head, with D the head size and scale 1/√D:

    S = Q Kᵀ / √D (causal: S_ij = -inf for j > i),  P = softmax(S),  O = (P ∘ Z) V,
    lse_i = log Σ_j exp(S_ij),  Z = keep / (1 - p)  (Z = 1 without dropout).

Q, K and V are read straight out of qkv (B, T, 3C) by strides (head h: columns h·D + [0, D) of
each third); O is written in (B, T, C), heads concatenated, as the output projection wants it.

Forward (FlashAttention-2): one program per (query block of BLOCK_M rows, batch·head). It streams
key blocks of BLOCK_N with an online softmax in fp32 (base 2: exp2 of log2e-scaled scores). Key
blocks entirely above the diagonal are never visited (loop bound); those entirely below run
without masks; only the BLOCK_M / BLOCK_N blocks on the diagonal are masked. The row logsumexp
is saved, so backward recomputes P exactly instead of storing it.

Backward: delta_i = Σ_j dO_ij O_ij (a small preprocessing kernel), then two passes without atomics,
so dQKV is deterministic. dK/dV: one program per key block, looping over the query blocks at and
below the diagonal. dQ: one program per query block, looping over the key blocks up to the
diagonal (it recomputes S and dP a second time: the price of determinism). Derivatives:
dV = (P∘Z)ᵀ dO, dP = (dO Vᵀ) ∘ Z, dS = P ∘ (dP − delta), dQ = dS K / √D, dK = dSᵀ Q / √D.

Dropout: no mask tensor exists. Keep draws are Philox4x32-7 (kernels/philox.py's philox: tl.philox with
wide multiplies) keyed by the seed (an int64 (1,) tensor loaded in-kernel: no host sync); one call
yields four 32-bit words = sixteen 8-bit draws (FlashAttention-2's p_dropout_in_uint8_t), for the
16 score elements one thread of the wgmma accumulator owns: query rows i, i + 8 (i % 16 < 8) ×
the column pairs 2q + {0, 1} of four consecutive 8-column blocks (see _dropout_keep). So the
draws are built in the accumulator's own layout: no data moves between threads in the forward
and dQ passes (bf16/fp16; fp32's tiles are not wgmma's and move packed keep words, as dK/dV's).
The counter is (8·(i // 16) + i % 8, 4·(j // 32) + (j % 8) // 2, b·H + h, 0): no word wraps for
any realistic shape and no two elements share a byte. An element is dropped when
its byte < min(round(p·2⁸), 255) (the realised drop rate is p to within 2⁻⁹, as in
FlashAttention-2), and kept probabilities are scaled by exactly 1/(1-p). The draw depends on
(seed, b, h, i, j) only, never on block sizes, so forward, both backward passes and
attention_dropout_mask (for tests) agree bit for bit whatever their tiles. dK/dV works on
transposed tiles (keys × queries), where no thread owns a call's 16 elements (they span 32 key
rows, i.e. two warps; a thread of the transposed accumulator holds 4 of any call's elements):
each thread runs one call, packs its 16 keep bits into one word (byte compares four at a time,
_keep_msbs) and only those words cross threads, one conversion through shared memory (1 KB per
32×128 tile, one more bar.sync per iteration); each thread then tests the bits of its elements.
Seven Philox rounds pass BigCrush (Salmon et al., SC'11).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .device import on_tensor_device
from .philox import philox
from .pinning import pinned

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HEAD_DIMS = (16, 32, 64, 128)
_MAX_GRID_Y = 65535  # CUDA's limit on grid dimension 1 (and 2), which indexes batch·head
_DRAW_BITS = 8  # bits per attention dropout draw: 16 draws per Philox4x32 call
_INTERPRET = triton.knobs.runtime.interpret  # read when the @triton.jit below were created

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ---- shared device helpers --------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_MODE: tl.constexpr):
    """acc + a @ b in fp32. DOT_MODE: "ieee" (fp32 inputs, exact products), "tf32" (the default
    for fp16/bf16 inputs, where it changes nothing), "upcast" (bf16 under the Triton 3.6
    interpreter, whose dot multiplies bf16 bit patterns as integers: bf16 products are exact in
    fp32, so this is what the tensor cores compute)."""
    if DOT_MODE == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_MODE)
    return out


@triton.jit
def _opaque_zero(x):
    """0.0 the compiler cannot fold (x·0 is not 0 for x = inf or NaN; here x is finite). With a
    literal 0, LLVM moves `where(keep, p, 0)` past p's bf16 conversion and then selects the packed
    bf16 halves one at a time (2 PRMT + 2 SEL more per pair than 2 FSEL on fp32)."""
    return x * 0.0


@triton.jit
def _dropout_words(seed, bh, start_m, start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The four words of the Philox calls of a tile, each (BLOCK_M // 16, 8, BLOCK_N // 32, 4) =
    (a, r, g, q): call (8a + r + start_m // 2, 4g + q + start_n // 8, bh, 0) (see _dropout_keep)."""
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 32 == 0, "attention dropout: tiles must be multiples of 16 × 32")
    A: tl.constexpr = BLOCK_M // 16
    G: tl.constexpr = BLOCK_N // 32
    zero = tl.zeros((A, 8, G, 4), dtype=tl.int32)
    c0 = (start_m // 2 + 8 * tl.arange(0, A))[:, None, None, None] + tl.arange(0, 8)[None, :, None, None] + zero
    c1 = (start_n // 8 + 4 * tl.arange(0, G))[None, None, :, None] + tl.arange(0, 4)[None, None, None, :] + zero
    w0, w1, w2, w3 = philox(seed, c0, c1, bh + zero)
    return w0, w1, w2, w3


@triton.jit
def _dropout_keep(seed, bh, start_m, start_n, drop_thresh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep mask (BLOCK_M, BLOCK_N) of queries start_m + [0, BLOCK_M) × keys start_n + [0, BLOCK_N)
    of head bh (= b·H + h); start_m, BLOCK_M multiples of 16, start_n, BLOCK_N multiples of 32.
    Query i = 16a + 8h + r, key j = 32g + 8k + 2q + e (r < 8, k < 4, q < 4, e < 2) reads byte
    y = 2(k % 2) + e of word w = 2h + k // 2 of Philox4x32-7(seed, (8a + r, 4g + q, bh, 0)) and is
    kept iff that byte ≥ drop_thresh. Those 16 elements are exactly the ones a single thread of
    the wgmma accumulator holds (rows lane/4 + {0, 8}, columns 2·(lane % 4) + {0, 1} of each
    8-column block), so the draws need no data movement."""
    w0, w1, w2, w3 = _dropout_words(seed, bh, start_m, start_n, BLOCK_M, BLOCK_N)
    x = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # (a, r, g, q, k // 2, h)
    # byte y on top: u32 compare with thresh·2²⁴ is the byte compare (lower bytes cannot lift it)
    z = tl.join(tl.join(x << 24, x << 16), tl.join(x << 8, x))  # (a, r, g, q, k // 2, h, e, k % 2)
    keep = z >= drop_thresh.to(tl.uint32) << 24
    keep = tl.permute(keep, (0, 5, 1, 2, 4, 7, 3, 6))  # (a, h, r, g, k // 2, k % 2, q, e)
    return tl.reshape(keep, (BLOCK_M, BLOCK_N))


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _keep_msbs(x, t7, u):
    """Bit 8y + 7 of the result: byte y of x ≥ the threshold t (t7 = (t mod 128)·0x01010101,
    u = all ones iff t < 128), four bytes at once. d = (x | 0x80808080) − t7 borrows from no byte,
    and its byte msb says (byte mod 128) ≥ t mod 128; with x's own msb that decides byte ≥ t: or
    for t < 128, and for t ≥ 128 (the majority of d, x and u, one LOP3)."""
    d = (x | 0x80808080) - t7
    return ((d & x) | (u & (d | x))) & 0x80808080


@triton.jit
def _dropout_keep_bits(seed, bh, start_m, start_n, drop_thresh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """_dropout_keep packed: (BLOCK_M // 16, 8, BLOCK_N // 32, 4) int32, one Philox call each,
    whose bit 8y + 7 − w is the keep of byte y of word w (see _dropout_keep_unpack)."""
    w0, w1, w2, w3 = _dropout_words(seed, bh, start_m, start_n, BLOCK_M, BLOCK_N)
    t = drop_thresh.to(tl.uint32)
    t7 = (t & 127) * 0x01010101
    u = tl.where(t < 128, 0xFFFFFFFF, 0).to(tl.uint32)
    k = (_keep_msbs(w0, t7, u) | (_keep_msbs(w1, t7, u) >> 1)
         | (_keep_msbs(w2, t7, u) >> 2) | (_keep_msbs(w3, t7, u) >> 3))
    # A reduction over a size-1 axis changes nothing but pins the layout: Triton does not
    # rematerialise through reductions, so the transposed tile's layout conversion happens on
    # these words (one per call) instead of recomputing every call in each of the four threads
    # that hold part of it (4× the Philox work; sm_90a dK/dV 32×128: 510 instructions, not 365).
    k = tl.reduce(k[:, :, :, :, None], 4, _bit_or)
    return k.to(tl.int32, bitcast=True)


@triton.jit
def _dropout_keep_unpack(bits, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) keep mask from _dropout_keep_bits: query 16a + 8h + r, key
    32g + 8(2kk + k2) + 2q + e reads bit 8(2·k2 + e) + 7 − (2h + kk) of entry (a, r, g, q)."""
    b = bits[:, None, :, :, None, None, :, None]  # (a, h, r, g, kk, k2, q, e)
    h = tl.arange(0, 2)[None, :, None, None, None, None, None, None]
    kk = tl.arange(0, 2)[None, None, None, None, :, None, None, None]
    k2 = tl.arange(0, 2)[None, None, None, None, None, :, None, None]
    e = tl.arange(0, 2)[None, None, None, None, None, None, None, :]
    keep = ((b >> (16 * k2 + 8 * e + 7 - 2 * h - kk)) & 1) != 0
    return tl.reshape(keep, (BLOCK_M, BLOCK_N))


@triton.jit
def _keep_tile(seed, bh, start_m, start_n, drop_thresh,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, OWNED: tl.constexpr):
    """The keep mask of _dropout_keep, built to suit the consumer's layout. OWNED: a wgmma
    accumulator in query-major order (fwd and dQ in bf16/fp16), whose threads hold whole calls,
    so each byte is compared where it is drawn. Otherwise (dK/dV's transposed tiles, fp32's
    non-wgmma layouts) a call's elements span threads: its 16 keep bits are packed into one
    word and only those words move (sm_90a fp32 fwd 32×32: 15 → 5 bar.sync per iteration)."""
    if OWNED:
        keep = _dropout_keep(seed, bh, start_m, start_n, drop_thresh, BLOCK_M, BLOCK_N)
    else:
        bits = _dropout_keep_bits(seed, bh, start_m, start_n, drop_thresh, BLOCK_M, BLOCK_N)
        keep = _dropout_keep_unpack(bits, BLOCK_M, BLOCK_N)
    return keep


# ---- forward ----------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_base,  # K of this (batch, head), row 0; V is C columns further
    start_m, lo, hi, stride_t, T, C, qk_scale, seed, bh, drop_thresh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DIAGONAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [lo, hi); masked iff DIAGONAL."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ptrs = k_base + offs_n[:, None] * stride_t + offs_d[None, :]
        if DIAGONAL:
            k = tl.load(ptrs, mask=offs_n[:, None] < T, other=0.0)
            v = tl.load(ptrs + C, mask=offs_n[:, None] < T, other=0.0)
        else:  # below the diagonal every key index is < start_m < T
            k = tl.load(ptrs)
            v = tl.load(ptrs + C)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_MODE)  # unscaled
        if DIAGONAL:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        # qk_scale > 0 commutes with max: scaling the row maximum, not the tile, lets the scale
        # ride in the exp2 argument's FMA (s·qk_scale − m) instead of a multiply per score
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # finite: every row sees key 0 or its own first
        p = tl.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts dropped entries too
        if HAS_DROPOUT:
            keep = _keep_tile(seed, bh, start_m, start_n, drop_thresh, BLOCK_M, BLOCK_N, DOT_MODE != "ieee")
            p = tl.where(keep, p, _opaque_zero(qk_scale))
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_MODE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    qkv_ptr,  # (B, T, 3C) packed Q | K | V, read by strides
    out_ptr,  # (B, T, C) output O, heads concatenated, qkv's dtype
    lse_ptr,  # (B, H, T) float32 row logsumexp of the scaled scores
    seed_ptr,  # (1,) int64 dropout seed (unused without dropout)
    stride_qkv_b, stride_qkv_t, stride_out_b, stride_out_t,
    T, H, C,
    sm_scale,  # 1/√D
    drop_thresh,  # drop when the 8-bit draw < this
    drop_scale,  # 1/(1-p)
    T_BUCKET,  # next_power_of_2(T): part of the autotuning key
    BH_BUCKET,  # next_power_of_2(B·H), the grid's height: part of the autotuning key
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_MODE: tl.constexpr,
):
    # the unmasked loop runs to start_m: a key block must not straddle the diagonal
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "attention forward: BLOCK_M must be a multiple of BLOCK_N")
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows (most key blocks) first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * stride_qkv_t + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    qk_scale = sm_scale * LOG2E

    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    # key blocks strictly below the diagonal, then the BLOCK_M / BLOCK_N blocks on it
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, q_base + C, start_m, 0, start_m, stride_qkv_t, T, C, qk_scale, seed, bh,
        drop_thresh, HEAD_DIM, BLOCK_M, BLOCK_N, False, HAS_DROPOUT, DOT_MODE,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, q_base + C, start_m, start_m, tl.minimum(start_m + BLOCK_M, T), stride_qkv_t,
        T, C, qk_scale, seed, bh, drop_thresh, HEAD_DIM, BLOCK_M, BLOCK_N, True, HAS_DROPOUT, DOT_MODE,
    )

    out = acc * (drop_scale / l_i)[:, None]
    out_ptrs = out_ptr + b.to(tl.int64) * stride_out_b + offs_m[:, None] * stride_out_t + h * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_m[:, None] < T)
    lse = (m_i + tl.log2(l_i)) * LN2  # back from base 2 to natural log
    tl.store(lse_ptr + bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


# ---- backward ---------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(
    out_ptr,  # (B, T, C) forward output O
    dout_ptr,  # (B, T, C) upstream gradient dO
    delta_ptr,  # (B, H, T) float32 output: delta_i = Σ_d dO_id O_id, per head
    stride_out_b, stride_out_t, stride_dout_b, stride_dout_t,
    T, H,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = h * HEAD_DIM + tl.arange(0, HEAD_DIM)
    ok = offs_m[:, None] < T
    o = tl.load(out_ptr + b.to(tl.int64) * stride_out_b + offs_m[:, None] * stride_out_t + cols[None, :],
                mask=ok, other=0.0)
    do = tl.load(dout_ptr + b.to(tl.int64) * stride_dout_b + offs_m[:, None] * stride_dout_t + cols[None, :],
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    q_base,  # Q of this (batch, head), row 0
    do_base,  # dO of this (batch, head), row 0
    lse_base,  # lse of this (batch, head), row 0
    delta_base,  # delta of this (batch, head), row 0
    start_n, lo, hi, stride_qkv_t, stride_dout_t, T, qk_scale, seed, bh, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DIAGONAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """Accumulates dK, dV of one key block over query blocks [lo, hi), in transposed (key-major)
    orientation so that K and V stay the left operands; masked iff DIAGONAL."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        qT = tl.load(q_base + offs_m[None, :] * stride_qkv_t + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dout_t + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E  # rows ≥ T: P = 0
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        # Pᵀ = exp(Sᵀ − lse), recomputed exactly from the saved row statistics
        sT = _dot(k, qT, tl.zeros((BLOCK_N, BLOCK_M), tl.float32), DOT_MODE) * qk_scale
        pT = tl.exp2(sT - lse2[None, :])
        if DIAGONAL:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        dpT = _dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), DOT_MODE)  # (dO Vᵀ)ᵀ
        if HAS_DROPOUT:
            keepT = tl.trans(_keep_tile(seed, bh, start_m, start_n, drop_thresh, BLOCK_M, BLOCK_N, False))
            pzT = tl.where(keepT, pT, _opaque_zero(qk_scale))  # (P ∘ keep)ᵀ: 1/(1-p) goes on dV at the end
            dpT = tl.where(keepT, dpT, 0.0) * drop_scale  # dP = (dO Vᵀ) ∘ Z (the product fuses below)
        else:
            pzT = pT
        dv = _dot(pzT.to(do.dtype), do, dv, DOT_MODE)  # dV += (P ∘ Z)ᵀ dO
        dsT = pT * (dpT - delta[None, :])  # dS = P ∘ (dP − delta)
        dk = _dot(dsT.to(qT.dtype), tl.trans(qT), dk, DOT_MODE)  # dK += dSᵀ Q (· 1/√D later)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    qkv_ptr,  # (B, T, 3C) packed Q | K | V from the forward
    dout_ptr,  # (B, T, C) upstream gradient dO
    lse_ptr,  # (B, H, T) float32 row logsumexp saved by the forward
    delta_ptr,  # (B, H, T) float32 rowsum(dO ∘ O) per head
    seed_ptr,  # (1,) int64 dropout seed (unused without dropout)
    dqkv_ptr,  # (B, T, 3C) output; this kernel writes the dK and dV thirds
    stride_qkv_b, stride_qkv_t, stride_dout_b, stride_dout_t,
    T, H, C, sm_scale, drop_thresh, drop_scale,
    T_BUCKET,  # next_power_of_2(T): part of the autotuning key
    BH_BUCKET,  # next_power_of_2(B·H), the grid's height: part of the autotuning key
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_MODE: tl.constexpr,
):
    # the unmasked loop starts at start_n + BLOCK_N: a query block must not straddle the diagonal
    tl.static_assert(BLOCK_N % BLOCK_M == 0, "attention dK/dV: BLOCK_N must be a multiple of BLOCK_M")
    start_n = tl.program_id(0) * BLOCK_N  # block 0 has the most query blocks: it goes first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    head = b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    kv_offs = offs_n[:, None] * stride_qkv_t + offs_d[None, :]
    k = tl.load(qkv_ptr + head + C + kv_offs, mask=offs_n[:, None] < T, other=0.0)
    v = tl.load(qkv_ptr + head + 2 * C + kv_offs, mask=offs_n[:, None] < T, other=0.0)
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    qk_scale = sm_scale * LOG2E
    do_base = dout_ptr + b.to(tl.int64) * stride_dout_b + h * HEAD_DIM
    lse_base = lse_ptr + bh.to(tl.int64) * T
    delta_base = delta_ptr + bh.to(tl.int64) * T

    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    # the BLOCK_N / BLOCK_M query blocks on the diagonal, then every query block below it
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, qkv_ptr + head, do_base, lse_base, delta_base, start_n, start_n,
        tl.minimum(start_n + BLOCK_N, T), stride_qkv_t, stride_dout_t, T, qk_scale, seed, bh,
        drop_thresh, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, True, HAS_DROPOUT, DOT_MODE,
    )
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, qkv_ptr + head, do_base, lse_base, delta_base, start_n, start_n + BLOCK_N, T,
        stride_qkv_t, stride_dout_t, T, qk_scale, seed, bh, drop_thresh, drop_scale,
        HEAD_DIM, BLOCK_M, BLOCK_N, False, HAS_DROPOUT, DOT_MODE,
    )
    dk *= sm_scale
    dv *= drop_scale  # the loop summed (P ∘ keep)ᵀ dO: Z = keep / (1 - p)
    out_ty = dqkv_ptr.dtype.element_ty
    tl.store(dqkv_ptr + head + C + kv_offs, dk.to(out_ty), mask=offs_n[:, None] < T)
    tl.store(dqkv_ptr + head + 2 * C + kv_offs, dv.to(out_ty), mask=offs_n[:, None] < T)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,
    k_base,  # K of this (batch, head), row 0; V is C columns further
    start_m, lo, hi, stride_t, T, C, qk_scale, seed, bh, drop_thresh, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DIAGONAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """Accumulates dS K of one query block over key blocks [lo, hi); masked iff DIAGONAL."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ptrs = k_base + offs_n[None, :] * stride_t + offs_d[:, None]
        if DIAGONAL:
            kT = tl.load(ptrs, mask=offs_n[None, :] < T, other=0.0)
            vT = tl.load(ptrs + C, mask=offs_n[None, :] < T, other=0.0)
        else:  # below the diagonal every key index is < start_m < T
            kT = tl.load(ptrs)
            vT = tl.load(ptrs + C)
        s = _dot(q, kT, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_MODE) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if DIAGONAL:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = _dot(do, vT, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), DOT_MODE)
        if HAS_DROPOUT:
            keep = _keep_tile(seed, bh, start_m, start_n, drop_thresh, BLOCK_M, BLOCK_N, DOT_MODE != "ieee")
            dp = tl.where(keep, dp, 0.0) * drop_scale  # dP = (dO Vᵀ) ∘ Z (the product fuses below)
        ds = p * (dp - delta[:, None])  # dS = P ∘ (dP − delta)
        dq = _dot(ds.to(kT.dtype), tl.trans(kT), dq, DOT_MODE)  # dQ += dS K (· 1/√D later)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    qkv_ptr,  # (B, T, 3C) packed Q | K | V from the forward
    dout_ptr,  # (B, T, C) upstream gradient dO
    lse_ptr,  # (B, H, T) float32 row logsumexp saved by the forward
    delta_ptr,  # (B, H, T) float32 rowsum(dO ∘ O) per head
    seed_ptr,  # (1,) int64 dropout seed (unused without dropout)
    dqkv_ptr,  # (B, T, 3C) output; this kernel writes the dQ third
    stride_qkv_b, stride_qkv_t, stride_dout_b, stride_dout_t,
    T, H, C, sm_scale, drop_thresh, drop_scale,
    T_BUCKET,  # next_power_of_2(T): part of the autotuning key
    BH_BUCKET,  # next_power_of_2(B·H), the grid's height: part of the autotuning key
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_MODE: tl.constexpr,
):
    # the unmasked loop runs to start_m: a key block must not straddle the diagonal
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "attention dQ: BLOCK_M must be a multiple of BLOCK_N")
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    head = b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    q_offs = offs_m[:, None] * stride_qkv_t + offs_d[None, :]
    q = tl.load(qkv_ptr + head + q_offs, mask=row_ok[:, None], other=0.0)
    do_ptrs = (dout_ptr + b.to(tl.int64) * stride_dout_b + h * HEAD_DIM
               + offs_m[:, None] * stride_dout_t + offs_d[None, :])
    do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(lse_ptr + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    qk_scale = sm_scale * LOG2E

    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, qkv_ptr + head + C, start_m, 0, start_m, stride_qkv_t, T, C, qk_scale,
        seed, bh, drop_thresh, drop_scale, HEAD_DIM, BLOCK_M, BLOCK_N, False, HAS_DROPOUT, DOT_MODE,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, qkv_ptr + head + C, start_m, start_m, tl.minimum(start_m + BLOCK_M, T),
        stride_qkv_t, T, C, qk_scale, seed, bh, drop_thresh, drop_scale,
        HEAD_DIM, BLOCK_M, BLOCK_N, True, HAS_DROPOUT, DOT_MODE,
    )
    dq *= sm_scale
    tl.store(dqkv_ptr + head + q_offs, dq.to(dqkv_ptr.dtype.element_ty), mask=row_ok[:, None])


# ---- dropout mask (tests) ---------------------------------------------------------------


@triton.jit
def _attn_dropout_mask_kernel(
    seed_ptr,  # (1,) int64 dropout seed
    keep_ptr,  # (B, H, T, T) uint8 output: 1 = kept
    T, drop_thresh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    keep = _dropout_keep(tl.load(seed_ptr), bh, tl.program_id(0) * BLOCK_M, start_n, drop_thresh, BLOCK_M, BLOCK_N)
    ptrs = keep_ptr + bh.to(tl.int64) * T * T + offs_m[:, None].to(tl.int64) * T + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < T) & (offs_n[None, :] < T))


# ---- launch configurations --------------------------------------------------------------
# Under the interpreter: one small fixed configuration per kernel (BLOCK_M ≠ BLOCK_N on purpose,
# so tests cover the multi-block diagonal). On CUDA: autotuned per (next_power_of_2(T),
# next_power_of_2(B·H), D, dropout, dtype): the best tile depends on how many programs fill the
# GPU, so a config tuned at one batch is not reused at another; bucketing T and B·H keeps
# variable-length fine-tuning and ragged last batches from re-tuning at every shape.
# Constraints: forward and dQ need BLOCK_M % BLOCK_N == 0, dK/dV BLOCK_N % BLOCK_M == 0; every
# BLOCK_M is a multiple of 16 and every BLOCK_N of 32 (a Philox call covers 16 rows × 32 columns).


def _configs(shapes: list[tuple[int, ...]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) → autotune configs."""
    return [
        triton.Config({"BLOCK_M": s[0], "BLOCK_N": s[1]}, num_warps=s[2], num_stages=s[3],
                      maxnreg=(s[4:] or (None,))[0])
        for s in shapes
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """fp32 (the exact "ieee" correctness path on CUDA cores) runs its one small tile. Otherwise:
    short sequences skip tiles much longer than themselves (the last config is the smallest), and
    register-capped configs are for dropout only (without it they equal their uncapped twin)."""
    if getattr(named_args.get("qkv_ptr"), "dtype", None) == torch.float32:
        return [c for c in configs if _is_fp32_tile(c)]
    lowp = [c for c in configs if not _is_fp32_tile(c)]
    limit = max(named_args["T_BUCKET"], 64)
    kept = [
        c for c in lowp
        if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= limit and (c.maxnreg is None or kwargs.get("HAS_DROPOUT"))
    ]
    return kept or lowp[-1:]


def _is_fp32_tile(config: triton.Config) -> bool:
    return any(config is c for c in _FP32_TILES)


_FP32_TILES: list[triton.Config] = []  # the fp32-only config of each autotuned kernel


def _autotune(kernel, shapes: list[tuple[int, ...]], fp32_shape: tuple[int, ...]):
    # dtype joins the key by itself (the autotuner keys on argument dtypes too)
    key = ["T_BUCKET", "BH_BUCKET", "HEAD_DIM", "HAS_DROPOUT"]
    (fp32,) = _configs([fp32_shape])
    _FP32_TILES.append(fp32)
    return triton.autotune(_configs(shapes) + [fp32], key=key, prune_configs_by={"early_config_prune": _prune})(kernel)


_FWD_INTERPRET = {"BLOCK_M": 64, "BLOCK_N": 32}
_DKDV_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 32}
_DQ_INTERPRET = {"BLOCK_M": 64, "BLOCK_N": 32}
# Why these tiles (sm_90a registers, spills, the configs dropped): bench/results/attention-tiles-sm90a.md
_fwd_tuned = _autotune(
    _attn_fwd_kernel,
    [(128, 64, 8, 3), (128, 64, 8, 3, 128), (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
    (32, 32, 4, 2),
)
_dkdv_tuned = _autotune(_attn_bwd_dkdv_kernel, [(32, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 2)], (16, 32, 4, 2))
_dq_tuned = _autotune(
    _attn_bwd_dq_kernel,
    [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 2)],
    (32, 32, 4, 2),
)
_TUNED = {"fwd": _fwd_tuned, "dkdv": _dkdv_tuned, "dq": _dq_tuned}  # the autotuned passes, by name
_DELTA_BLOCK = 16 if _INTERPRET else 64
_MASK_BLOCKS = (64, 64)  # any tiles give the same mask; large ones are fastest everywhere


def _launch(kernel, tuned, interpret_config: dict, block: str, T: int, bh: int, *args, **meta) -> None:
    """Runs `kernel` over grid (cdiv(T, meta[block]), B·H): the fixed config under the
    interpreter, the autotuned one on CUDA, or the pinned one. `block` is the tile the grid
    walks: BLOCK_M or BLOCK_N."""
    pin = pinned(kernel)
    if pin is not None:
        tile, options = pin
        kernel[(triton.cdiv(T, tile[block]), bh)](*args, **meta, **tile, **options)
    elif _INTERPRET:
        kernel[(triton.cdiv(T, interpret_config[block]), bh)](*args, **meta, **interpret_config)
    else:
        tuned[lambda cfg: (triton.cdiv(T, cfg[block]), bh)](*args, **meta)


# ---- launchers (the gpt1:: ops' kernels) ------------------------------------------------


def _check_qkv(name: str, qkv: Tensor, n_head: int) -> tuple[int, int, int, int]:
    """Validates qkv and n_head; returns (B, T, C, D)."""
    if not isinstance(qkv, Tensor):
        raise ValueError(f"{name}: qkv must be a Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 3:
        raise ValueError(f"{name}: qkv must be (B, T, 3C), got shape {tuple(qkv.shape)}")
    if qkv.dtype not in _DTYPES:
        raise ValueError(f"{name}: qkv dtype must be float32, float16 or bfloat16, got {qkv.dtype}")
    if not isinstance(n_head, int) or n_head < 1:
        raise ValueError(f"{name}: n_head must be a positive int, got {n_head!r}")
    B, T, C3 = qkv.shape
    if C3 % (3 * n_head) != 0:
        raise ValueError(
            f"{name}: qkv's last dim must be 3C with C divisible by n_head={n_head}, got {C3}"
        )
    C = C3 // 3
    D = C // n_head
    if D not in _HEAD_DIMS:
        raise ValueError(f"{name}: head_dim = C / n_head = {C} / {n_head} = {D}, expected one of {_HEAD_DIMS}")
    if not qkv.is_contiguous():
        raise ValueError(f"{name}: qkv must be contiguous, got strides {qkv.stride()} for shape {tuple(qkv.shape)}")
    if B * n_head > _MAX_GRID_Y:
        raise ValueError(f"{name}: batch * n_head = {B * n_head} exceeds the grid limit {_MAX_GRID_Y}")
    if qkv.device.type == "cpu" and not _INTERPRET:
        raise ValueError(f"{name}: CPU tensors need the Triton interpreter "
                         "(TRITON_INTERPRET=1 before importing triton)")
    return B, T, C, D


def _check_dropout(name: str, dropout_p: float, seed: Tensor | None, device: torch.device) -> tuple[bool, int, float]:
    """Validates dropout_p and seed; returns (has_dropout, 8-bit drop threshold, 1/(1-p))."""
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if dropout_p == 0:
        return False, 0, 1.0
    if seed is None:
        raise ValueError(f"{name}: dropout_p={dropout_p} > 0 needs a seed (an int64 tensor of shape (1,)), got None")
    if not isinstance(seed, Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(
            f"{name}: seed must be an int64 tensor with one element, got "
            + (f"{seed.dtype} of shape {tuple(seed.shape)}" if isinstance(seed, Tensor) else type(seed).__name__)
        )
    if seed.device != device:
        raise ValueError(f"{name}: seed is on {seed.device} but qkv is on {device}")
    return True, min(round(dropout_p * 2**_DRAW_BITS), 2**_DRAW_BITS - 1), 1.0 / (1.0 - dropout_p)


def _dot_mode(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee"  # fp32 must match the fp32 reference to 1e-5: no TF32
    return "upcast" if dtype == torch.bfloat16 and _INTERPRET else "tf32"


@on_tensor_device
def attention_fwd(qkv: Tensor, n_head: int, dropout_p: float, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    """qkv (B, T, 3C) → out (B, T, C) in qkv's dtype, lse (B, H, T) float32 (before dropout)."""
    B, T, C, D = _check_qkv("attention_fwd", qkv, n_head)
    has_dropout, thresh, drop_scale = _check_dropout("attention_fwd", dropout_p, seed, qkv.device)
    out = qkv.new_empty(B, T, C)
    lse = qkv.new_empty(B, n_head, T, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    _launch(
        _attn_fwd_kernel, _fwd_tuned, _FWD_INTERPRET, "BLOCK_M", T, B * n_head,
        qkv, out, lse, seed if has_dropout else lse,  # any pointer stands in for an unused seed
        qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
        T, n_head, C, 1.0 / math.sqrt(D), thresh, drop_scale, triton.next_power_of_2(T),
        triton.next_power_of_2(B * n_head), HEAD_DIM=D, HAS_DROPOUT=has_dropout, DOT_MODE=_dot_mode(qkv.dtype),
    )
    return out, lse


@on_tensor_device
def attention_bwd(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, n_head: int, dropout_p: float, seed: Tensor | None
) -> Tensor:
    """dO (B, T, C) → dQKV (B, T, 3C) in qkv's dtype, dQ | dK | dV packed like qkv."""
    B, T, C, D = _check_qkv("attention_bwd", qkv, n_head)
    has_dropout, thresh, drop_scale = _check_dropout("attention_bwd", dropout_p, seed, qkv.device)
    for arg, t in (("grad_out", grad_out), ("out", out)):
        if not isinstance(t, Tensor) or t.shape != (B, T, C) or t.dtype != qkv.dtype:
            raise ValueError(
                f"attention_bwd: {arg} must be a {qkv.dtype} tensor of shape {(B, T, C)}, got "
                + (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__)
            )
    if not isinstance(lse, Tensor) or lse.shape != (B, n_head, T) or lse.dtype != torch.float32:
        raise ValueError(
            f"attention_bwd: lse must be a float32 tensor of shape {(B, n_head, T)}, got "
            + (f"{lse.dtype} {tuple(lse.shape)}" if isinstance(lse, Tensor) else type(lse).__name__)
        )
    for arg, t in (("grad_out", grad_out), ("out", out), ("lse", lse)):
        if t.device != qkv.device:
            raise ValueError(f"attention_bwd: {arg} is on {t.device} but qkv is on {qkv.device}")
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    lse = lse.contiguous()
    grad_qkv = torch.empty_like(qkv)  # written whole by the dK/dV and dQ passes
    if grad_qkv.numel() == 0:
        return grad_qkv
    delta = torch.empty_like(lse)
    bh = B * n_head
    _attn_bwd_delta_kernel[(triton.cdiv(T, _DELTA_BLOCK), bh)](
        out, grad_out, delta, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
        T, n_head, HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK,
    )
    args = (
        qkv, grad_out, lse, delta, seed if has_dropout else lse, grad_qkv,
        qkv.stride(0), qkv.stride(1), grad_out.stride(0), grad_out.stride(1),
        T, n_head, C, 1.0 / math.sqrt(D), thresh, drop_scale, triton.next_power_of_2(T),
        triton.next_power_of_2(bh),
    )
    meta = dict(HEAD_DIM=D, HAS_DROPOUT=has_dropout, DOT_MODE=_dot_mode(qkv.dtype))
    _launch(_attn_bwd_dkdv_kernel, _dkdv_tuned, _DKDV_INTERPRET, "BLOCK_N", T, bh, *args, **meta)
    _launch(_attn_bwd_dq_kernel, _dq_tuned, _DQ_INTERPRET, "BLOCK_M", T, bh, *args, **meta)
    return grad_qkv


def _dropout_mask(seed: Tensor, batch: int, n_head: int, seq_len: int, dropout_p: float,
                  blocks: tuple[int, int]) -> Tensor:
    """attention_dropout_mask with explicit (BLOCK_M, BLOCK_N) tiles (tests vary them)."""
    name = "attention_dropout_mask"
    for arg, value, least in (("batch", batch, 0), ("n_head", n_head, 1), ("seq_len", seq_len, 0)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: {arg} must be an int >= {least}, got {value!r}")
    if not isinstance(seed, Tensor):
        raise ValueError(f"{name}: seed must be an int64 tensor of shape (1,), got {type(seed).__name__}")
    if batch * n_head > _MAX_GRID_Y:
        raise ValueError(f"{name}: batch * n_head = {batch * n_head} exceeds the grid limit {_MAX_GRID_Y}")
    if seed.device.type == "cpu" and not _INTERPRET:
        raise ValueError(f"{name}: CPU tensors need the Triton interpreter "
                         "(TRITON_INTERPRET=1 before importing triton)")
    if blocks[0] % 16 or blocks[1] % 32:
        raise ValueError(f"{name}: tiles must be multiples of (16, 32), got {blocks}")
    if dropout_p == 0:  # the kernels draw nothing; the seed may be anything
        return torch.ones(batch, n_head, seq_len, seq_len, dtype=torch.bool, device=seed.device)
    _, thresh, _ = _check_dropout(name, dropout_p, seed, seed.device)
    keep = torch.empty(batch, n_head, seq_len, seq_len, dtype=torch.uint8, device=seed.device)
    if keep.numel():
        block_m, block_n = blocks
        grid = (triton.cdiv(seq_len, block_m), triton.cdiv(seq_len, block_n), batch * n_head)
        _attn_dropout_mask_kernel[grid](seed, keep, seq_len, thresh, BLOCK_M=block_m, BLOCK_N=block_n)
    return keep.view(torch.bool)


@on_tensor_device
def attention_dropout_mask(seed: Tensor, batch: int, n_head: int, seq_len: int, dropout_p: float) -> Tensor:
    """The keep-mask (B, H, T, T) bool that attention_fwd/bwd apply for this seed and p."""
    return _dropout_mask(seed, batch, n_head, seq_len, dropout_p, _MASK_BLOCKS)
