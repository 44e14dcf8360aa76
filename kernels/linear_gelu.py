"""y = GELU(x Wᵀ + b): the FFN's first projection (c_fc) and its activation, fused.

Spec: engine/model/reference.py::linear_gelu. x (N, C), weight (F, C) in nn.Linear layout, bias (F,).
GELU "tanh" (OpenAI's): 0.5·z·(1 + tanh(k·(z + a·z³))) = z·σ(2u), u = k·(z + a·z³),
k = √(2/π), a = 0.044715; "none": 0.5·z·(1 + erf(z/√2)). pre = x Wᵀ + b is saved for backward.

Two forward implementations, both tested, chosen by DEFAULT_IMPL (bench/gpu_check.py times both):

* "triton": a tiled Triton matmul (tl.dot over a K loop, fp32 accumulation, grouped launch
  order so neighbouring programs share W tiles in L2) whose epilogue adds the bias and applies
  GELU, writing pre and y straight from registers;
* "cublas": torch.addmm (cuBLAS, bias in its epilogue) writes pre, then one Triton elementwise
  kernel reads pre and writes y.

DEFAULT_IMPL = "cublas", by reasoning (not yet measured on the H200). For GPT-1's
N = 16384, C = 768, F = 3072 in bf16 the GEMM is 77 GFLOP (~0.11 ms at cuBLAS's ~700 TFLOP/s)
and the separate GELU pass moves 2·N·F·2 B = 200 MB (~0.045 ms), so fusing the epilogue
can save at most ~30%. A Triton GEMM on Hopper without TMA/warp specialisation typically
runs 15-30% behind cuBLAS, which eats that saving, and its speed depends on autotune configs
nobody has timed yet; cuBLAS is the predictable floor. Once bench/gpu_check.py has timed
both, flip DEFAULT_IMPL (one line) if "triton" wins.

Backward: dpre = grad_y · GELU'(pre) in one Triton elementwise pass, which also writes float32
partial column sums of dpre per fixed group of rows (grad_bias, reduced in a fixed order:
deterministic, no atomics); grad_x = dpre W and grad_weight = dpreᵀ x are cuBLAS matmuls.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .device import on_tensor_device
from .pinning import pinned

DEFAULT_IMPL = "cublas"  # "cublas" or "triton": see the module docstring

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_APPROXIMATE = ("tanh", "none")
_ELEMWISE_BLOCK = 4096  # elements per program of the forward GELU pass
_BWD_ROWS, _BWD_BLOCK_N = 32, 128  # backward tile: rows × columns of dpre
_MAX_GROUPS = 64  # row groups of the backward at most: grad_bias partials ≤ 64·F floats


@triton.jit
def _gelu(z, APPROX_TANH: tl.constexpr):
    """GELU(z), z float32."""
    if APPROX_TANH:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)  # k·(z + a·z³)
        return z * tl.sigmoid(2.0 * u)  # 0.5·(1 + tanh(u)) = σ(2u)
    else:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z, APPROX_TANH: tl.constexpr):
    """dGELU/dz at z (float32)."""
    if APPROX_TANH:
        # y = z·s, s = σ(2u), u = k·(z + a·z³):
        # dy/dz = s + z·2·s·(1 - s)·du/dz, du/dz = k·(1 + 3a·z²)
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        s = tl.sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        return s + 2.0 * z * s * (1.0 - s) * du
    else:
        # y = z·Φ(z)  ⇒  dy/dz = Φ(z) + z·φ(z), φ(z) = exp(-z²/2)/√(2π)
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)


@triton.jit
def _linear_gelu_matmul_kernel(
    x_ptr,  # (M, K) input rows
    w_ptr,  # (N, K) weight, nn.Linear layout: the kernel reads its transpose by strides
    b_ptr,  # (N,) bias
    y_ptr,  # (M, N) output GELU(pre)
    pre_ptr,  # (M, N) output pre = x Wᵀ + b, saved for backward
    M,
    N,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,  # row stride of y and pre (both contiguous (M, N))
    # K is constexpr: Triton 3.6's interpreter cannot loop to a runtime bound under numpy >= 2.4
    # (triton-lang/triton#9171); one compile per width, and even K drops the K masks.
    K: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 (matches the fp32 reference), else ignored
    # off-GPU only: Triton 3.6's interpreter keeps bf16 as uint16 and its tl.dot multiplies the
    # bit patterns, so there bf16 tiles are upcast first (exact: a bf16 product fits in fp32)
    UPCAST_OPERANDS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped launch order: GROUP_M row tiles sweep the column tiles together, so the W tiles
    # they share stay in L2
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * n_tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_m = min(n_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_m
    pid_n = (pid % tiles_per_group) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # out-of-range rows/columns wrap around (loads stay in bounds, unmasked); stores are masked
    x_ptrs = x_ptr + (rows % M).to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = w_ptr + (cols % N).to(tl.int64)[None, :] * stride_wn + ks[:, None] * stride_wk  # Wᵀ tile

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if K % BLOCK_K == 0:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = ks < K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST_OPERANDS:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # epilogue: bias and GELU on the float32 accumulator
    col_ok = cols < N
    pre = acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = _gelu(pre, APPROX_TANH)
    out = rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    ok = (rows < M)[:, None] & col_ok[None, :]
    tl.store(pre_ptr + out, pre.to(pre_ptr.dtype.element_ty), mask=ok)
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=ok)


# Configs that compile for sm_90a without spills within 227 KiB, wgmma in bf16
# (bench/sm90_report.py; tests/ops/test_sm90.py gates it). Dropped for spilling at GPT-1's
# shapes: 128×256×64 w8 (32 B), 256×128×64 w8 and 128×128×32 w4. float32 (ieee, the
# correctness path) gets the last config only.
_MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4),
]


def _prune_matmul(configs: list, named_args: dict, **kwargs) -> list:
    """float32 needs one correct config, not a tuned one: the last (smallest) of the list."""
    return configs[-1:] if named_args["x_ptr"].dtype == torch.float32 else configs


_matmul_autotuned = triton.autotune(  # CUDA only; the interpreter uses _INTERPRETER_TILE
    configs=_MATMUL_CONFIGS, key=["M", "N", "K"], prune_configs_by={"early_config_prune": _prune_matmul},
)(_linear_gelu_matmul_kernel)
_INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}


@triton.jit
def _gelu_fwd_kernel(
    pre_ptr,  # (n,) flattened pre = x Wᵀ + b
    y_ptr,  # (n,) flattened output GELU(pre)
    n_elements,
    APPROX_TANH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elements
    z = tl.load(pre_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _gelu(z, APPROX_TANH).to(y_ptr.dtype.element_ty), mask=ok)


# the row count is not specialised: every M (variable-length fine-tuning batches) runs one compile
@triton.jit(do_not_specialize=["M", "blocks_per_group"])
def _gelu_bwd_kernel(
    dy_ptr,  # (M, N) upstream gradient ∂L/∂y
    pre_ptr,  # (M, N) saved pre-activation z
    dpre_ptr,  # (M, N) output ∂L/∂z = ∂L/∂y · GELU'(z)
    db_part_ptr,  # (n_groups, N) float32 partial column sums of ∂L/∂z (→ grad_bias)
    M,
    N,
    blocks_per_group,  # row tiles per program, in order
    APPROX_TANH: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    db = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for i in range(0, blocks_per_group):
        rows = (group * blocks_per_group + i) * ROWS + tl.arange(0, ROWS)
        ok = (rows < M)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(pre_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dz = dy * _gelu_grad(z, APPROX_TANH)  # masked entries: dy = 0 ⇒ dz = 0
        tl.store(dpre_ptr + offs, dz.to(dpre_ptr.dtype.element_ty), mask=ok)
        db += dz  # ∂L/∂b = Σ_rows ∂L/∂z
    tl.store(db_part_ptr + group.to(tl.int64) * N + cols, tl.sum(db, axis=0), mask=col_ok)


# ---- launchers ----------------------------------------------------------------------------


def _check(x: Tensor, weight: Tensor, approximate: str) -> None:
    if x.dim() != 2 or x.shape[1] == 0 or x.dtype not in _DTYPES:
        raise ValueError(
            f"linear_gelu: x must be 2-D (N, C ≥ 1) float32/float16/bfloat16, got {x.dtype} of shape {tuple(x.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"linear_gelu: weight must be (F, {x.shape[1]}) {x.dtype} on {x.device}, "
            f"got {weight.dtype} of shape {tuple(weight.shape)} on {weight.device}"
        )
    if approximate not in _APPROXIMATE:
        raise ValueError(f"linear_gelu: approximate must be 'tanh' or 'none', got {approximate!r}")


def _check_bias(bias: Tensor, x: Tensor, F: int) -> None:
    if bias.shape != (F,) or bias.dtype not in (x.dtype, torch.float32) or bias.device != x.device:
        raise ValueError(
            f"linear_gelu: bias must be ({F},) of dtype {x.dtype} or float32 on {x.device}, "
            f"got {bias.dtype} of shape {tuple(bias.shape)} on {bias.device}"
        )


@on_tensor_device
def linear_gelu_fwd_triton_matmul(x: Tensor, weight: Tensor, bias: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
    """(y, pre) with pre = x Wᵀ + b by a Triton matmul whose epilogue applies bias and GELU."""
    _check(x, weight, approximate)
    _check_bias(bias, x, weight.shape[0])
    (M, K), N = x.shape, weight.shape[0]
    y = x.new_empty(M, N)
    pre = x.new_empty(M, N)
    if M == 0 or N == 0:
        return y, pre
    args = (x, weight, bias.contiguous(), y, pre, M, N, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), N)
    upcast = not x.is_cuda and x.dtype == torch.bfloat16
    common = {
        "K": K,
        "APPROX_TANH": approximate == "tanh",
        "DOT_PRECISION": "ieee" if x.dtype == torch.float32 or upcast else "tf32",
        "UPCAST_OPERANDS": upcast,
    }
    pin = pinned(_linear_gelu_matmul_kernel)
    if pin is not None:  # tests: one of _MATMUL_CONFIGS, on either device
        tile, options = pin
        grid = (triton.cdiv(M, tile["BLOCK_M"]) * triton.cdiv(N, tile["BLOCK_N"]),)
        _linear_gelu_matmul_kernel[grid](*args, **common, **tile, **options)
    elif x.is_cuda:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _matmul_autotuned[grid](*args, **common)
    else:
        tile = _INTERPRETER_TILE
        grid = (triton.cdiv(M, tile["BLOCK_M"]) * triton.cdiv(N, tile["BLOCK_N"]),)
        _linear_gelu_matmul_kernel[grid](*args, **common, **tile)
    return y, pre


def gelu_fwd_launch() -> dict:
    """The elementwise GELU pass's tile and warps."""
    return dict(BLOCK=_ELEMWISE_BLOCK, num_warps=8)


def gelu_bwd_launch(M: int) -> dict:
    """The dGELU pass: ROWS × BLOCK_N tiles, blocks_per_group row tiles per program (a runtime
    argument), n_groups programs."""
    n_tiles = triton.cdiv(M, _BWD_ROWS)
    per_group = max(1, triton.cdiv(n_tiles, _MAX_GROUPS))
    return dict(ROWS=_BWD_ROWS, BLOCK_N=_BWD_BLOCK_N, blocks_per_group=per_group,
                n_groups=triton.cdiv(n_tiles, per_group), num_warps=8)


def _gelu_elementwise(pre: Tensor, approximate: str) -> Tensor:
    """GELU(pre) elementwise, pre contiguous: the second half of the "cublas" forward."""
    y = torch.empty_like(pre)
    n = pre.numel()
    if n:
        launch = gelu_fwd_launch()
        _gelu_fwd_kernel[(triton.cdiv(n, launch["BLOCK"]),)](pre, y, n, APPROX_TANH=approximate == "tanh", **launch)
    return y


@on_tensor_device
def linear_gelu_fwd_cublas(x: Tensor, weight: Tensor, bias: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
    """(y, pre) with pre = torch.addmm(b, x, Wᵀ) (cuBLAS), then one fused Triton GELU pass."""
    _check(x, weight, approximate)
    _check_bias(bias, x, weight.shape[0])
    pre = torch.addmm(bias.to(x.dtype), x, weight.t())
    return _gelu_elementwise(pre, approximate), pre


CANDIDATES = {"cublas": linear_gelu_fwd_cublas, "triton": linear_gelu_fwd_triton_matmul}


@on_tensor_device
def linear_gelu_fwd(x: Tensor, weight: Tensor, bias: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
    """(y, pre): y = GELU(x Wᵀ + b), pre saved for backward; by CANDIDATES[DEFAULT_IMPL]."""
    if DEFAULT_IMPL not in CANDIDATES:
        raise ValueError(f"gpt1_kernels.linear_gelu.DEFAULT_IMPL must be one of {sorted(CANDIDATES)}, "
                         f"got {DEFAULT_IMPL!r}")
    return CANDIDATES[DEFAULT_IMPL](x, weight, bias, approximate)


@on_tensor_device
def linear_gelu_bwd(
    grad_y: Tensor, x: Tensor, weight: Tensor, pre: Tensor, approximate: str
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_x (N, C), grad_weight (F, C), grad_bias (F,) in weight's dtype."""
    _check(x, weight, approximate)
    M, F = x.shape[0], weight.shape[0]
    for name, t in (("grad_y", grad_y), ("pre", pre)):
        if t.shape != (M, F) or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"linear_gelu: {name} must be ({M}, {F}) {x.dtype} on {x.device}, "
                f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}"
            )
    grad_y, pre = grad_y.contiguous(), pre.contiguous()
    dpre = torch.empty_like(pre)
    launch = gelu_bwd_launch(M)
    n_groups, per_group = launch.pop("n_groups"), launch.pop("blocks_per_group")
    db_part = torch.zeros(n_groups, F, dtype=torch.float32, device=x.device)
    if M and F:
        _gelu_bwd_kernel[(n_groups, triton.cdiv(F, launch["BLOCK_N"]))](
            grad_y, pre, dpre, db_part, M, F, per_group, APPROX_TANH=approximate == "tanh", **launch,
        )
    grad_x = dpre @ weight  # (N, F) @ (F, C)
    grad_weight = dpre.t() @ x  # (F, N) @ (N, C)
    grad_bias = db_part.sum(0).to(weight.dtype)  # fixed-order sum of the group partials
    return grad_x, grad_weight, grad_bias
