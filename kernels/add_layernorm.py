"""y = LayerNorm(x + dropout(residual)): the join of a post-LN block, fused with its dropout.

Spec: engine/model/reference.py::add_layernorm. Rows of width C (GPT-1: C = 768).

Forward, per row: s = x + r·keep/(1-p); mean = Σs/C; rstd = 1/√(Σ(s-mean)²/C + eps);
y = (s - mean)·rstd·γ + β. Statistics are float32 whatever the input dtype, and saved.

Parallelisation: a row is a head of BLOCK_C columns (the largest power of two ≤ C) and a tail of
TAIL (a power of two covering the rest; masked), so C = 768 = 512 + 256 has no idle lanes and
no dropout draws past column C. Forward: one program per tile of ROWS whole rows, ROWS growing
as C shrinks so every program moves ~4K elements. Backward: one warp per program, one row per
step: at C = 768 each thread owns 24 elements, i.e. exactly three 8-column Philox groups (fewer
elements per thread would make threads recompute the same draws), its row sums are warp
shuffles (no bar.sync), and tile, x̂ and the dγ/dβ accumulators fit in ~240 registers × 32
threads: 8 CTAs per SM on sm_90 (bench/sm90_report.py; was 207 × 256 threads, 1 CTA).
x and r are read once in each direction.

Dropout is the point of the fusion: no mask tensor exists. With the seed an int64 (1,) tensor read
in-kernel (no host sync), element (i, j) of the (N, C) rows is kept iff d(i, j) ≥ round(p·2¹⁶), where

    d(i, j) = 16-bit half (j mod 8) mod 2 (0: low) of word ⌊(j mod 8)/2⌋ of
              Philox4x32-7(key = (seed mod 2³², ⌊seed/2³²⌋), counter = (i, ⌊j/8⌋, 0, 0)),

and kept elements are scaled by exactly 1/(1-p) (the realised drop rate is round(p·2¹⁶)/2¹⁶). One
Philox call serves 8 consecutive columns: the ~100 integer operations of a full call per element
(tl.rand) would make this memory-bound kernel compute-bound. The draw is kernels/philox.py's
draws16 with counter word 2 = 0, and csrc/philox.h's keep_row: the C++ CPU kernel draws the same
mask bit for bit. i < 2³² and ⌊j/8⌋ < 2³² (C ≤ 2³⁵) keep counters distinct; larger shapes are refused. Both
parts start at a multiple of 8 and are ≥ 8 wide, so each covers whole groups of 8 columns; the
draw depends on (seed, i, j) only, so forward, backward and add_layernorm_dropout_mask (for
tests) agree bit for bit.

Backward is deterministic without atomics: each program owns a fixed group of rows, writes its
float32 partial sums of dγ, dβ to row g of a (n_groups, C) buffer, and torch sums those in a
fixed order. n_groups depends on N only, never on the device.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .device import on_tensor_device
from .philox import draws16

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE = 4096  # elements per forward program (ROWS · (BLOCK_C + TAIL)) for moderate C
_MAX_GROUPS = 1024  # backward programs at most (~8 per SM on an H200): partials ≤ 1024·C floats
_BWD_ROWS, _BWD_WARPS = 1, 1  # backward: one row per step, one warp (see bwd_launch)
_DRAW_BITS = 16  # bits per dropout draw: 8 draws per Philox4x32 call
_MAX_ROWS = 2**32  # dropout counters: row i < 2³² and column group ⌊j/8⌋ < 2³²
_MAX_COLS = 2**35


@triton.jit
def _keep(seed, rows, start, drop_thresh, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """Keep-mask of rows × columns start + [0, WIDTH): 16-bit draw ≥ drop_thresh (module docstring)."""
    # counter word 0 is the row mod 2³² (int32 bits: tl.philox reads them as uint32)
    return draws16(seed, 0, rows.to(tl.int32), start, ROWS, WIDTH) >= drop_thresh


@triton.jit
def _load_part(x_ptr, r_ptr, seed, rows, row_ok, C, drop_thresh, dropout_scale,
               START: tl.constexpr, WIDTH: tl.constexpr, ROWS: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """Columns START + [0, WIDTH) of the rows: (offsets, mask, s = x + dropout(r), keep) in fp32."""
    cols = START + tl.arange(0, WIDTH)
    ok = row_ok[:, None] & (cols < C)[None, :]
    offs = rows[:, None] * C + cols[None, :]  # (ROWS, WIDTH) element index
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    keep = ok
    if HAS_DROPOUT:
        keep = _keep(seed, rows, START, drop_thresh, ROWS, WIDTH)
        r = tl.where(keep, r * dropout_scale, 0.0)
    return offs, ok, x + r, keep


@triton.jit
def _add_layernorm_fwd_kernel(
    x_ptr,  # (N, C) input x
    r_ptr,  # (N, C) residual r, dropped out before the add
    w_ptr,  # (C,) LayerNorm gain γ
    b_ptr,  # (C,) LayerNorm bias β
    seed_ptr,  # (1,) int64 dropout seed (unused without dropout)
    y_ptr,  # (N, C) output y, x's dtype
    mean_ptr,  # (N,) float32 row means of s = x + dropout(r)
    rstd_ptr,  # (N,) float32 row 1/√(var + eps)
    N,
    C,
    eps,
    drop_thresh,  # drop when the 16-bit draw < this = round(p·2¹⁶)
    dropout_scale,  # 1 / (1 - p)
    HAS_DROPOUT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,  # columns [0, BLOCK_C): the head part
    TAIL: tl.constexpr,  # columns [BLOCK_C, BLOCK_C + TAIL): the tail part
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    offs0, ok0, s0, _ = _load_part(x_ptr, r_ptr, seed, rows, row_ok, C, drop_thresh, dropout_scale,
                                   0, BLOCK_C, ROWS, HAS_DROPOUT)
    offs1, ok1, s1, _ = _load_part(x_ptr, r_ptr, seed, rows, row_ok, C, drop_thresh, dropout_scale,
                                   BLOCK_C, TAIL, ROWS, HAS_DROPOUT)
    mean = (tl.sum(s0, axis=1) + tl.sum(s1, axis=1)) / C
    d0 = tl.where(ok0, s0 - mean[:, None], 0.0)
    d1 = tl.where(ok1, s1 - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt((tl.sum(d0 * d0, axis=1) + tl.sum(d1 * d1, axis=1)) / C + eps)
    _store_y(w_ptr, b_ptr, y_ptr, offs0, ok0, d0, rstd, C, 0, BLOCK_C)
    _store_y(w_ptr, b_ptr, y_ptr, offs1, ok1, d1, rstd, C, BLOCK_C, TAIL)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _store_y(w_ptr, b_ptr, y_ptr, offs, ok, d, rstd, C, START: tl.constexpr, WIDTH: tl.constexpr):
    """y = (s - mean)·rstd·γ + β for columns START + [0, WIDTH)."""
    cols = START + tl.arange(0, WIDTH)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_part(dy_ptr, x_ptr, r_ptr, w_ptr, seed, rows, row_ok, mean, rstd, C, drop_thresh, dropout_scale,
              START: tl.constexpr, WIDTH: tl.constexpr, ROWS: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """Columns START + [0, WIDTH): (offsets, mask, keep, dy, x̂, ĝ = dy·γ) in fp32."""
    offs, ok, s, keep = _load_part(x_ptr, r_ptr, seed, rows, row_ok, C, drop_thresh, dropout_scale,
                                   START, WIDTH, ROWS, HAS_DROPOUT)
    cols = START + tl.arange(0, WIDTH)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    xhat = tl.where(ok, (s - mean[:, None]) * rstd[:, None], 0.0)  # x̂ = (s - mean)·rstd
    return offs, ok, keep, dy, xhat, dy * w[None, :]


@triton.jit
def _store_dx(dx_ptr, dr_ptr, offs, ok, keep, g, xhat, rstd, mean_g, mean_gx, dropout_scale,
              HAS_DROPOUT: tl.constexpr):
    """∂L/∂s = rstd·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)) = ∂L/∂x; ∂L/∂r = ∂L/∂s·keep/(1-p)."""
    dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if HAS_DROPOUT:
        tl.store(dr_ptr + offs, tl.where(keep, dx * dropout_scale, 0.0).to(dr_ptr.dtype.element_ty), mask=ok)


# row counts are not specialised: every N (variable-length fine-tuning batches) runs one compile
@triton.jit(do_not_specialize=["N", "blocks_per_group"])
def _add_layernorm_bwd_kernel(
    dy_ptr,  # (N, C) upstream gradient ∂L/∂y
    x_ptr,  # (N, C) forward input x
    r_ptr,  # (N, C) forward residual r (before dropout)
    w_ptr,  # (C,) LayerNorm gain γ
    mean_ptr,  # (N,) float32 forward row means
    rstd_ptr,  # (N,) float32 forward row 1/√(var + eps)
    seed_ptr,  # (1,) int64 dropout seed (unused without dropout)
    dx_ptr,  # (N, C) output ∂L/∂x
    dr_ptr,  # (N, C) output ∂L/∂r (written only with dropout)
    dw_part_ptr,  # (n_groups, C) float32 partial Σ dy·x̂ of this program's rows
    db_part_ptr,  # (n_groups, C) float32 partial Σ dy of this program's rows
    N,
    C,
    drop_thresh,  # drop when the 16-bit draw < this = round(p·2¹⁶)
    dropout_scale,  # 1 / (1 - p)
    blocks_per_group,  # row tiles of ROWS rows per program, in order
    HAS_DROPOUT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,  # columns [0, BLOCK_C): the head part
    TAIL: tl.constexpr,  # columns [BLOCK_C, BLOCK_C + TAIL): the tail part
):
    group = tl.program_id(0)
    # ∂L/∂γ = Σ_rows dy·x̂, ∂L/∂β = Σ_rows dy (masked rows and columns contribute 0)
    dw0 = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    db0 = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    dw1 = tl.zeros([ROWS, TAIL], dtype=tl.float32)
    db1 = tl.zeros([ROWS, TAIL], dtype=tl.float32)
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    for i in range(0, blocks_per_group):
        rows = (group.to(tl.int64) * blocks_per_group + i) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < N
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        offs0, ok0, keep0, dy0, xhat0, g0 = _bwd_part(dy_ptr, x_ptr, r_ptr, w_ptr, seed, rows, row_ok, mean, rstd,
                                                      C, drop_thresh, dropout_scale, 0, BLOCK_C, ROWS, HAS_DROPOUT)
        offs1, ok1, keep1, dy1, xhat1, g1 = _bwd_part(dy_ptr, x_ptr, r_ptr, w_ptr, seed, rows, row_ok, mean, rstd,
                                                      C, drop_thresh, dropout_scale, BLOCK_C, TAIL, ROWS, HAS_DROPOUT)
        # y = x̂·γ + β ⇒ ĝ = ∂L/∂x̂ = dy·γ; x̂ depends on s through mean and rstd (see _store_dx)
        mean_g = (tl.sum(g0, axis=1) + tl.sum(g1, axis=1)) / C
        mean_gx = (tl.sum(g0 * xhat0, axis=1) + tl.sum(g1 * xhat1, axis=1)) / C
        _store_dx(dx_ptr, dr_ptr, offs0, ok0, keep0, g0, xhat0, rstd, mean_g, mean_gx, dropout_scale, HAS_DROPOUT)
        _store_dx(dx_ptr, dr_ptr, offs1, ok1, keep1, g1, xhat1, rstd, mean_g, mean_gx, dropout_scale, HAS_DROPOUT)
        dw0 += dy0 * xhat0
        db0 += dy0
        dw1 += dy1 * xhat1
        db1 += dy1
    _store_partials(dw_part_ptr, db_part_ptr, group, dw0, db0, C, 0, BLOCK_C)
    _store_partials(dw_part_ptr, db_part_ptr, group, dw1, db1, C, BLOCK_C, TAIL)


@triton.jit
def _store_partials(dw_part_ptr, db_part_ptr, group, dw, db, C, START: tl.constexpr, WIDTH: tl.constexpr):
    """Row g of the partial-sum buffers, columns START + [0, WIDTH): the program's column sums."""
    cols = START + tl.arange(0, WIDTH)
    part = group.to(tl.int64) * C + cols
    tl.store(dw_part_ptr + part, tl.sum(dw, axis=0), mask=cols < C)
    tl.store(db_part_ptr + part, tl.sum(db, axis=0), mask=cols < C)


@triton.jit
def _add_layernorm_dropout_mask_kernel(
    seed_ptr,  # (1,) int64 dropout seed
    keep_ptr,  # (rows, cols) int8 output keep-mask
    n_rows,
    n_cols,
    drop_thresh,  # drop when the 16-bit draw < this = round(p·2¹⁶)
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,  # columns [0, BLOCK_C): the head part
    TAIL: tl.constexpr,  # columns [BLOCK_C, BLOCK_C + TAIL): the tail part
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    seed = tl.load(seed_ptr)
    _store_keep(keep_ptr, seed, rows, n_rows, n_cols, drop_thresh, 0, BLOCK_C, ROWS)
    _store_keep(keep_ptr, seed, rows, n_rows, n_cols, drop_thresh, BLOCK_C, TAIL, ROWS)


@triton.jit
def _store_keep(keep_ptr, seed, rows, n_rows, n_cols, drop_thresh,
                START: tl.constexpr, WIDTH: tl.constexpr, ROWS: tl.constexpr):
    cols = START + tl.arange(0, WIDTH)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    keep = _keep(seed, rows, START, drop_thresh, ROWS, WIDTH)
    tl.store(keep_ptr + rows[:, None] * n_cols + cols[None, :], keep.to(tl.int8), mask=ok)


# ---- launchers ----------------------------------------------------------------------------


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _split(C: int) -> tuple[int, int]:
    """(BLOCK_C, TAIL): a row as a head of BLOCK_C columns (the largest power of two ≤ C, ≥ 8)
    and a tail of TAIL ≥ 8 (a power of two covering the rest, or 8 masked columns when there is
    none). C = 768 → 512 + 256: no masked lanes, so no dropout draws for columns past C (one
    power-of-two tile of 1024 would waste a quarter of them). Both parts start at a multiple of
    8, so each covers whole 8-column groups of dropout draws."""
    head = _floor_pow2(max(C, 8))
    return head, triton.next_power_of_2(max(C - head, 8))


def fwd_launch(C: int) -> dict:
    """Forward (and mask) tiling: whole rows per program, ~_TILE elements per program."""
    head, tail = _split(C)
    rows = _floor_pow2(min(64, max(1, _TILE // (head + tail))))
    return dict(ROWS=rows, BLOCK_C=head, TAIL=tail, num_warps=_floor_pow2(min(16, max(1, rows * (head + tail) // 512))))


def bwd_launch(N: int, C: int) -> dict:
    """Backward tiling: _BWD_ROWS rows per step on _BWD_WARPS warps (the module docstring says why;
    bench/sm90_report.py shows registers × threads), blocks_per_group steps per program (a runtime
    argument), n_groups ≤ _MAX_GROUPS programs."""
    head, tail = _split(C)
    rows = _floor_pow2(min(_BWD_ROWS, max(1, _TILE // (head + tail))))
    n_blocks = triton.cdiv(N, rows)
    per_group = max(1, triton.cdiv(n_blocks, _MAX_GROUPS))
    return dict(ROWS=rows, BLOCK_C=head, TAIL=tail, blocks_per_group=per_group,
                n_groups=triton.cdiv(n_blocks, per_group), num_warps=_BWD_WARPS)


def _check_dropout(dropout_p: float, seed: Tensor | None, device: torch.device, N: int, C: int) -> int:
    """Validates dropout_p, seed and the (N, C) counter range; returns the 16-bit drop threshold."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"add_layernorm: dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_p > 0:
        if seed is None:
            raise ValueError(f"add_layernorm: dropout_p={dropout_p} needs a seed tensor, got None")
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device:
            raise ValueError(
                f"add_layernorm: seed must be an int64 tensor of one element on {device}, got "
                f"{seed.dtype} of shape {tuple(seed.shape)} on {seed.device}"
            )
        if N > _MAX_ROWS or C > _MAX_COLS:
            raise ValueError(
                f"add_layernorm: dropout draws need rows <= 2**32 and columns <= 2**35 (distinct Philox "
                f"counters), got {N} rows of {C}"
            )
    return round(dropout_p * 2**_DRAW_BITS)


def _check_x(x: Tensor) -> None:
    if x.dim() != 2 or x.shape[1] == 0 or x.dtype not in _DTYPES:
        raise ValueError(
            "add_layernorm: x must be 2-D (N, C ≥ 1) float32/float16/bfloat16, "
            f"got {x.dtype} of shape {tuple(x.shape)}"
        )


def _check_rows(name: str, t: Tensor, like: Tensor, any_float: bool = False) -> None:
    """Same shape and device as `like`; same dtype too, unless any_float (the residual under
    autocast is a bf16/fp16 matmul output while the stream x stays float32, as F.layer_norm)."""
    dtype_ok = t.dtype in _DTYPES if any_float else t.dtype == like.dtype
    if t.shape != like.shape or not dtype_ok or t.device != like.device:
        expected = "float32/float16/bfloat16" if any_float else str(like.dtype)
        raise ValueError(
            f"add_layernorm: {name} must be {expected} of shape {tuple(like.shape)} on {like.device}, "
            f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}"
        )


def _check_param(name: str, t: Tensor, x: Tensor) -> None:
    C = x.shape[1]
    if t.shape != (C,) or t.dtype not in (x.dtype, torch.float32) or t.device != x.device:
        raise ValueError(
            f"add_layernorm: {name} must be ({C},) of dtype {x.dtype} or float32 on {x.device}, "
            f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}"
        )


@on_tensor_device
def add_layernorm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float, dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """y, mean, rstd of LN(x + dropout(residual)); x, residual (N, C); stats float32 (N,)."""
    _check_x(x)
    _check_rows("residual", residual, x, any_float=True)
    _check_param("weight", weight, x)
    _check_param("bias", bias, x)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"add_layernorm: eps must be a finite number >= 0, got {eps!r}")
    N, C = x.shape
    thresh = _check_dropout(dropout_p, seed, x.device, N, C)
    x, residual, weight, bias = x.contiguous(), residual.contiguous(), weight.contiguous(), bias.contiguous()
    y = torch.empty_like(x)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return y, mean, rstd
    launch = fwd_launch(C)
    has_dropout = dropout_p > 0
    _add_layernorm_fwd_kernel[(triton.cdiv(N, launch["ROWS"]),)](
        x, residual, weight, bias, seed if has_dropout else x, y, mean, rstd,
        N, C, eps, thresh, 1.0 / (1.0 - dropout_p), HAS_DROPOUT=has_dropout, **launch,
    )
    return y, mean, rstd


@on_tensor_device
def add_layernorm_bwd(
    grad_y: Tensor, x: Tensor, residual: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
    dropout_p: float, seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad_x, grad_residual (empty when dropout_p == 0: it equals grad_x), grad_weight, grad_bias."""
    _check_x(x)
    _check_rows("grad_y", grad_y, x)
    _check_rows("residual", residual, x, any_float=True)
    _check_param("weight", weight, x)
    N, C = x.shape
    for name, stat in (("mean", mean), ("rstd", rstd)):
        if stat.shape != (N,) or stat.dtype != torch.float32 or stat.device != x.device:
            raise ValueError(
                f"add_layernorm: {name} must be float32 of shape ({N},) on {x.device}, "
                f"got {stat.dtype} of shape {tuple(stat.shape)} on {stat.device}"
            )
    thresh = _check_dropout(dropout_p, seed, x.device, N, C)
    grad_y, x, residual, weight = grad_y.contiguous(), x.contiguous(), residual.contiguous(), weight.contiguous()
    has_dropout = dropout_p > 0
    grad_x = torch.empty_like(x)
    grad_residual = torch.empty_like(residual) if has_dropout else x.new_empty(0)
    launch = bwd_launch(N, C)
    n_groups, per_group = launch.pop("n_groups"), launch.pop("blocks_per_group")
    dw_part = torch.zeros(n_groups, C, dtype=torch.float32, device=x.device)
    db_part = torch.zeros(n_groups, C, dtype=torch.float32, device=x.device)
    if N > 0:
        _add_layernorm_bwd_kernel[(n_groups,)](
            grad_y, x, residual, weight, mean.contiguous(), rstd.contiguous(), seed if has_dropout else x,
            grad_x, grad_residual if has_dropout else grad_x, dw_part, db_part,
            N, C, thresh, 1.0 / (1.0 - dropout_p), per_group, HAS_DROPOUT=has_dropout, **launch,
        )
    # second stage: a fixed-order column sum of the per-group partials (deterministic)
    return grad_x, grad_residual, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


@on_tensor_device
def add_layernorm_dropout_mask(seed: Tensor, rows: int, cols: int, dropout_p: float) -> Tensor:
    """The (rows, cols) bool keep-mask the kernels draw for this seed and p (module docstring)."""
    if rows < 0 or cols < 0:
        raise ValueError(f"add_layernorm_dropout_mask: rows and cols must be >= 0, got {rows} and {cols}")
    thresh = _check_dropout(dropout_p, seed, seed.device, rows, cols)
    keep = torch.ones(rows, cols, dtype=torch.int8, device=seed.device)
    if dropout_p > 0 and rows > 0 and cols > 0:
        launch = fwd_launch(cols)
        grid = (triton.cdiv(rows, launch["ROWS"]),)
        _add_layernorm_dropout_mask_kernel[grid](seed, keep, rows, cols, thresh, **launch)
    return keep.view(torch.bool)
