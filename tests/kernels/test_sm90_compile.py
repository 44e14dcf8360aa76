"""The CUDA build without a GPU: Triton kernels compile to sm_90 (H200) cubins with the bundled
ptxas (tests/helpers.py compile_for_sm90). Triton-only, so not in tests/ops/ (which runs each op
on every backend); kept until a gate over every autotune config replaces them."""
from __future__ import annotations

from helpers import compile_for_sm90

_ATTENTION = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import attention as A

B, T, H, D = 32, 512, 12, 64  # GPT-1's shape: every stride is a multiple of 16, as Triton specialises
C = H * D
ints = dict(stride_qkv_b=T * 3 * C, stride_qkv_t=3 * C, stride_out_b=T * C, stride_out_t=C, stride_dout_b=T * C,
            stride_dout_t=C, T=T, H=H, C=C, drop_thresh=6554, T_BUCKET=T)
ptrs = dict(qkv_ptr="*bf16", out_ptr="*bf16", dout_ptr="*bf16", dqkv_ptr="*bf16", lse_ptr="*fp32",
            delta_ptr="*fp32", seed_ptr="*i64", keep_ptr="*u8", sm_scale="fp32", drop_scale="fp32")
for tuned in (A._fwd_tuned, A._dkdv_tuned, A._dq_tuned):
    config = tuned.configs[0]
    fn = tuned.fn
    constexprs = dict(HEAD_DIM=D, HAS_DROPOUT=True, DOT_MODE="tf32", **config.kwargs)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            continue
        signature[name] = ptrs.get(name, "i32")
        if signature[name][0] == "*" or ints.get(name, 1) % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32), options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
    )
    ttgir = compiled.asm["ttgir"]
    assert "warp_group_dot" in ttgir, f"{fn.__name__}: no wgmma"
    assert "async_copy_global_to_local" in ttgir, f"{fn.__name__}: loads not pipelined"
    print("compiled", fn.__name__, "smem", compiled.metadata.shared)
"""


def test_attention_kernels_compile_for_sm90():
    """The autotuner's first config of each kernel, bf16 with dropout, compiles to an sm_90 cubin
    with the bundled ptxas (no GPU needed), using wgmma and pipelined (cp.async) tile loads."""
    out = compile_for_sm90(_ATTENTION)
    assert out.count("compiled") == 3, out


# ---- add+LayerNorm --------------------------------------------------------------------------

_ADD_LAYERNORM = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import add_layernorm as K

C = 768  # GPT-1's width, bf16 activations, dropout on
ROWS, BLOCK_C, num_warps = K._tiling(C)
per_thread = ROWS * BLOCK_C // (32 * num_warps)  # elements each thread owns in a tile
types = dict(seed_ptr="*i64", mean_ptr="*fp32", rstd_ptr="*fp32", dw_part_ptr="*fp32", db_part_ptr="*fp32",
             keep_ptr="*i8", eps="fp32", dropout_scale="fp32")
for fn in (K._add_layernorm_fwd_kernel, K._add_layernorm_bwd_kernel, K._add_layernorm_dropout_mask_kernel):
    constexprs = {k: v for k, v in dict(HAS_DROPOUT=True, BLOCKS_PER_GROUP=2, ROWS=ROWS, BLOCK_C=BLOCK_C).items()
                  if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            continue
        signature[name] = types.get(name, "*bf16" if name.endswith("_ptr") else "i32")
        if signature[name][0] == "*" or name in ("C", "n_cols"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps),
    )
    # 32-bit integer multiplies: a Philox4x32-7 call has 4 per round and serves 8 elements, so
    # per_thread / 8 calls need 3.5 per element; one 10-round call per element would need 40
    muls = len(re.findall(r"\b(?:mul|mad)\.(?:hi|lo|wide)\.[us]32", compiled.asm["ptx"]))
    assert muls <= 4 * 7 * per_thread // 8 + 8, f"{fn.__name__}: {muls} integer multiplies for {per_thread} elements"
    print("compiled", fn.__name__, "integer multiplies", muls, "for", per_thread, "elements per thread")
"""


def test_add_layernorm_kernels_compile_for_sm90_with_cheap_dropout():
    """Each kernel, bf16 with dropout at C = 768, compiles to an sm_90 cubin with the bundled
    ptxas (no GPU needed), spending one Philox4x32-7 call per 8 elements (counted in the PTX)."""
    out = compile_for_sm90(_ADD_LAYERNORM)
    assert out.count("compiled") == 3, out
