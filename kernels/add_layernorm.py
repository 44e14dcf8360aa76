"""y = LayerNorm(x + dropout(residual)): the join of a post-LN block, fused with its dropout.

Spec: engine/reference.py::add_layernorm. Rows of width C (GPT-1: C = 768).

Forward, per row: s = x + r·keep/(1-p); mean = Σs/C; rstd = 1/√(Σ(s-mean)²/C + eps);
y = (s - mean)·rstd·γ + β. Statistics are float32 whatever the input dtype, and saved.

Parallelisation: one program per tile of ROWS whole rows (BLOCK_C = next_power_of_2(max(C, 8))
columns, masked); ROWS grows as C shrinks so every program moves ~4K elements. x and r are read
once.

Dropout is the point of the fusion: no mask tensor exists. With the seed an int64 (1,) tensor read
in-kernel (no host sync), element (i, j) of the (N, C) rows is kept iff d(i, j) ≥ round(p·2¹⁶), where

    d(i, j) = 16-bit half (j mod 8) mod 2 (0: low) of word ⌊(j mod 8)/2⌋ of
              Philox4x32-7(key = (seed mod 2³², ⌊seed/2³²⌋), counter = (i, ⌊j/8⌋, 0, 0)),

and kept elements are scaled by exactly 1/(1-p) (the realised drop rate is round(p·2¹⁶)/2¹⁶). One
Philox call serves 8 consecutive columns: the ~100 integer operations of a full call per element
(tl.rand) would make this memory-bound kernel compute-bound. The draw is attention's
(kernels/attention.py, whose @triton.jit helper _dropout_draws is imported and called with
counter word 2 = 0) and csrc/philox.h's keep_row: the C++ CPU kernel draws the same mask bit for
bit. i < 2³² and ⌊j/8⌋ < 2³² (C ≤ 2³⁵) keep counters distinct; larger shapes are refused. Tiles
hold whole rows from column 0 with BLOCK_C ≥ 8 a power of two, so every tile covers whole groups
of 8 columns; the draw depends on (seed, i, j) only, so forward, backward and
add_layernorm_dropout_mask (for tests) agree bit for bit.

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

from .attention import _dropout_draws

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE = 4096  # elements per program (ROWS · BLOCK_C) for moderate C
_MAX_GROUPS = 512  # backward programs at most: partial-sum buffer ≤ 512·C floats
_DRAW_BITS = 16  # bits per dropout draw: 8 draws per Philox4x32 call
_MAX_ROWS = 2**32  # dropout counters: row i < 2³² and column group ⌊j/8⌋ < 2³²
_MAX_COLS = 2**35


@triton.jit
def _keep(seed, rows, drop_thresh, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Keep-mask of rows × columns [0, BLOCK_C): 16-bit draw ≥ drop_thresh (module docstring)."""
    # counter word 0 is the row mod 2³² (int32 bits: tl.philox reads them as uint32)
    return _dropout_draws(seed, 0, rows.to(tl.int32), 0, ROWS, BLOCK_C) >= drop_thresh


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
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * C + cols[None, :]  # (ROWS, BLOCK_C) element index

    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        r = tl.where(_keep(seed, rows, drop_thresh, ROWS, BLOCK_C), r * dropout_scale, 0.0)
    s = x + r
    mean = tl.sum(s, axis=1) / C
    d = tl.where(ok, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)

    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
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
    HAS_DROPOUT: tl.constexpr,
    # row tiles of ROWS rows per program, in order. constexpr: Triton 3.6's interpreter cannot
    # loop to a runtime bound under numpy >= 2.4 (triton-lang/triton#9171); one compile per value
    BLOCKS_PER_GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for i in range(0, BLOCKS_PER_GROUP):
        rows = (group.to(tl.int64) * BLOCKS_PER_GROUP + i) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < N
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * C + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = _keep(seed, rows, drop_thresh, ROWS, BLOCK_C)  # the forward's mask, regenerated
            r = tl.where(keep, r * dropout_scale, 0.0)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (x + r - mean[:, None]) * rstd[:, None], 0.0)  # x̂ = (s - mean)·rstd
        # y = x̂·γ + β  ⇒  ĝ = ∂L/∂x̂ = dy·γ and, differentiating x̂ through mean and rstd,
        # ∂L/∂s = rstd·(ĝ - mean(ĝ) - x̂·mean(ĝ·x̂)); ∂L/∂x = ∂L/∂s, ∂L/∂r = ∂L/∂s·keep/(1-p).
        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / C
        mean_gx = tl.sum(g * xhat, axis=1) / C
        dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if HAS_DROPOUT:
            dr = tl.where(keep, dx * dropout_scale, 0.0)
            tl.store(dr_ptr + offs, dr.to(dr_ptr.dtype.element_ty), mask=ok)
        # ∂L/∂γ = Σ_rows dy·x̂, ∂L/∂β = Σ_rows dy (masked rows and columns contribute 0)
        dw_acc += dy * xhat
        db_acc += dy
    part = group.to(tl.int64) * C + cols
    tl.store(dw_part_ptr + part, tl.sum(dw_acc, axis=0), mask=col_ok)
    tl.store(db_part_ptr + part, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def _add_layernorm_dropout_mask_kernel(
    seed_ptr,  # (1,) int64 dropout seed
    keep_ptr,  # (rows, cols) int8 output keep-mask
    n_rows,
    n_cols,
    drop_thresh,  # drop when the 16-bit draw < this = round(p·2¹⁶)
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = rows[:, None] * n_cols + cols[None, :]
    keep = _keep(tl.load(seed_ptr), rows, drop_thresh, ROWS, BLOCK_C)
    tl.store(keep_ptr + offs, keep.to(tl.int8), mask=ok)


# ---- launchers ----------------------------------------------------------------------------


def _tiling(C: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_C, num_warps): whole rows per program, ~_TILE elements per program. BLOCK_C is
    a power of two ≥ 8, so a tile covers whole 8-column groups of dropout draws."""
    block_c = triton.next_power_of_2(max(C, 8))
    rows = max(1, min(64, _TILE // block_c))
    num_warps = min(16, max(1, rows * block_c // 512))
    return rows, block_c, num_warps


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
    rows, block_c, num_warps = _tiling(C)
    has_dropout = dropout_p > 0
    _add_layernorm_fwd_kernel[(triton.cdiv(N, rows),)](
        x, residual, weight, bias, seed if has_dropout else x, y, mean, rstd,
        N, C, eps, thresh, 1.0 / (1.0 - dropout_p),
        HAS_DROPOUT=has_dropout, ROWS=rows, BLOCK_C=block_c, num_warps=num_warps,
    )
    return y, mean, rstd


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
    rows, block_c, num_warps = _tiling(C)
    n_blocks = triton.cdiv(N, rows)
    blocks_per_group = max(1, triton.cdiv(n_blocks, _MAX_GROUPS))
    n_groups = triton.cdiv(n_blocks, blocks_per_group)
    dw_part = torch.zeros(n_groups, C, dtype=torch.float32, device=x.device)
    db_part = torch.zeros(n_groups, C, dtype=torch.float32, device=x.device)
    if N > 0:
        _add_layernorm_bwd_kernel[(n_groups,)](
            grad_y, x, residual, weight, mean.contiguous(), rstd.contiguous(), seed if has_dropout else x,
            grad_x, grad_residual if has_dropout else grad_x, dw_part, db_part,
            N, C, thresh, 1.0 / (1.0 - dropout_p),
            HAS_DROPOUT=has_dropout, BLOCKS_PER_GROUP=blocks_per_group, ROWS=rows, BLOCK_C=block_c, num_warps=num_warps,
        )
    # second stage: a fixed-order column sum of the per-group partials (deterministic)
    return grad_x, grad_residual, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


def add_layernorm_dropout_mask(seed: Tensor, rows: int, cols: int, dropout_p: float) -> Tensor:
    """The (rows, cols) bool keep-mask the kernels draw for this seed and p (module docstring)."""
    if rows < 0 or cols < 0:
        raise ValueError(f"add_layernorm_dropout_mask: rows and cols must be >= 0, got {rows} and {cols}")
    thresh = _check_dropout(dropout_p, seed, seed.device, rows, cols)
    keep = torch.ones(rows, cols, dtype=torch.int8, device=seed.device)
    if dropout_p > 0 and rows > 0 and cols > 0:
        n_rows, block_c, num_warps = _tiling(cols)
        _add_layernorm_dropout_mask_kernel[(triton.cdiv(rows, n_rows),)](
            seed, keep, rows, cols, thresh, ROWS=n_rows, BLOCK_C=block_c, num_warps=num_warps
        )
    return keep.view(torch.bool)
