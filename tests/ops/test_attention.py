"""gpt1::attention_* on every backend against engine.model.reference.causal_attention."""

from __future__ import annotations

import contextlib
import functools
import math
import re

import numpy as np
import pytest
import torch
import triton

from backends import CPP, TRITON, cases
from engine import ops
from engine.model import reference
from gpt1_kernels.attention import _TUNED
from gpt1_kernels.pinning import pinned_config
from helpers import assert_close, assert_fa_rule
from helpers import attention_exact_reference as exact_reference
from helpers import attention_reference as autograd_reference
from helpers import attention_reference_lse as reference_lse
from philox_ref import attention_keep_mask

gpt1 = torch.ops.gpt1


def make_inputs(B, T, H, D, dtype=torch.float32, seed=0):
    """qkv (B, T, 3C) on the CPU and the one upstream gradient dout (B, T, C) of every comparison."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3 * H * D, generator=g)
    qkv[..., : H * D] *= 2.0  # peakier softmaxes than unit scores give
    return qkv.to(dtype), torch.randn(B, T, H * D, generator=g).to(dtype)


def run(backend, qkv, dout, H, p=0.0, seed=None):
    """out, lse and grad_qkv through the registered op and its autograd, back on the CPU."""
    leaf = backend.tensor(qkv).requires_grad_()
    out, lse = gpt1.attention_fwd(leaf, H, p, None if seed is None else backend.seed(seed))
    out.backward(backend.tensor(dout))
    return out.detach().cpu(), lse.cpu(), leaf.grad.cpu()


def mask_of(backend, seed, B, H, T, p):
    return gpt1.attention_dropout_mask(backend.seed(seed), B, H, T, p).cpu()


@functools.cache
def causal(T):
    """The (T, T) lower triangle: the mask entries that mean something (the rest is unspecified)."""
    return torch.ones(T, T, dtype=torch.bool).tril()


# (B, T, H, D): T = 1, primes, several tiles (the interpreter's are 16-32), head_dim 16..128;
# C++ also takes any head_dim and is run past its 256-key tile (online softmax across tiles).
SHAPES = [(1, 1, 2, 16), (2, 7, 1, 16), (1, 33, 2, 16), (2, 64, 1, 64), (1, 19, 1, 32), (1, 20, 1, 128)]
CPP_SHAPES = [(2, 1, 3, 24), (2, 37, 3, 20), (1, 5, 2, 7)]
COMPILED_SHAPES = [(2, 300, 2, 64), (1, 128, 4, 16)]


@pytest.mark.parametrize("backend,shape", cases(SHAPES, cpp=CPP_SHAPES, compiled=COMPILED_SHAPES), indirect=["backend"])
def test_fp32_forward_lse_and_grad_match_reference(backend, shape):
    B, T, H, D = shape
    qkv, dout = make_inputs(B, T, H, D)
    out, lse, grad = run(backend, qkv, dout, H)
    out_ref, grad_ref = exact_reference(qkv, dout, H)
    assert lse.shape == (B, H, T)
    assert_close(out, out_ref, "out")
    assert_close(lse, reference_lse(qkv, H), "lse")
    assert_close(grad, grad_ref, "grad_qkv")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("B,T,H,D,p", [(2, 33, 2, 16, 0.0), (1, 64, 1, 64, 0.0), (1, 40, 2, 32, 0.2)])
def test_low_precision_fa_rule(backend, dtype, B, T, H, D, p):
    qkv, dout = make_inputs(B, T, H, D, dtype)
    seed = 99 if p else None
    mask = mask_of(backend, seed, B, H, T, p) if p else None
    out, lse, grad = run(backend, qkv, dout, H, p, seed)
    assert out.dtype == grad.dtype == dtype and lse.dtype == torch.float32
    out_ref, grad_ref = autograd_reference(qkv.float(), dout.float(), H, p, mask, upcast=True)
    out_low, grad_low = autograd_reference(qkv, dout, H, p, mask)
    assert_fa_rule(out, out_ref, out_low, "out")
    assert_fa_rule(grad, grad_ref, grad_low, "grad_qkv")


# ---- every autotune config --------------------------------------------------------------


def _tuned_configs() -> list:
    """(kernel, index, p) for every config of the three attention autotuners, with and without
    dropout (register-capped configs are tuned with dropout only): the interpreter and the
    autotuner otherwise run one config each, so a tile-specific bug could hide in the others."""

    def tag(c):
        return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}" + (
            f"r{c.maxnreg}" if c.maxnreg else ""
        )

    return [
        pytest.param(name, i, p, id=f"{name}-{tag(c)}-p{p}")
        for name, tuned in _TUNED.items()
        for i, c in enumerate(tuned.configs)
        for p in (0.0, 0.1)
        if p or not c.maxnreg
    ]


@pytest.mark.gpu_first
@pytest.mark.parametrize("kernel,index,p", _tuned_configs())
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_every_tuned_config_matches_reference(backend, kernel, index, p):
    """One config pinned (the other kernels as usual) at T = two of its largest tile side + 44:
    the diagonal, blocks below it and a ragged end. fp32's tile in fp32 (1e-5), the others in
    bf16 by the FlashAttention rule; with dropout, against the op's own mask; the forward's
    configs on out and lse, the backward's on every gradient (the other backward pass pinned to
    its first config of the dtype). (dQ's fp32 tile was 16×32, whose
    unmasked loop ran into the diagonal: wrong fp32 gradients on CUDA.)"""
    from gpt1_kernels import attention as A

    tuned = _TUNED[kernel]
    config = tuned.configs[index]
    dtype = torch.float32 if A._is_fp32_tile(config) else torch.bfloat16
    B, T, H, D, seed = 1, 2 * max(config.kwargs.values()) + 44, 2, 16, 2**35 + 3
    qkv, dout = make_inputs(B, T, H, D, dtype)
    mask = mask_of(backend, seed, B, H, T, p) if p else None
    leaf = backend.tensor(qkv).requires_grad_()
    with contextlib.ExitStack() as pins:
        pins.enter_context(pinned_config(tuned, config))
        if kernel != "fwd":  # the other backward pass at its largest tile of this dtype: faster
            other = _TUNED["dq" if kernel == "dkdv" else "dkdv"]
            pins.enter_context(
                pinned_config(other, next(c for c in other.configs if A._is_fp32_tile(c) == (dtype == torch.float32)))
            )
        out, lse = gpt1.attention_fwd(leaf, H, p, backend.seed(seed) if p else None)
        if kernel != "fwd":
            out.backward(backend.tensor(dout))
    out = out.detach().cpu()
    if kernel == "fwd":
        assert_close(lse.cpu(), reference_lse(qkv.float(), H), "lse")
    if dtype == torch.float32:
        out_ref, grad_ref = exact_reference(qkv, dout, H, p, mask)
        assert_close(out, out_ref, "out")
        if kernel != "fwd":
            assert_close(leaf.grad.cpu(), grad_ref, "grad_qkv")
        return
    out_ref, grad_ref = autograd_reference(qkv.float(), dout.float(), H, p, mask, upcast=True)
    out_low, grad_low = autograd_reference(qkv, dout, H, p, mask)
    assert_fa_rule(out, out_ref, out_low, "out")
    if kernel != "fwd":
        assert_fa_rule(leaf.grad.cpu(), grad_ref, grad_low, "grad_qkv")


@pytest.mark.gpu_first
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_cuda_delta_block(backend, monkeypatch):
    """The GPU's rowsum(dO ∘ O) block (64 rows), which the interpreter never takes by itself
    (16): T = 100 ends in a partial block."""
    from gpt1_kernels import attention as A

    monkeypatch.setattr(A, "_DELTA_BLOCK", 64)
    qkv, dout = make_inputs(1, 100, 2, 16)
    _, _, grad = run(backend, qkv, dout, 2)
    assert_close(grad, exact_reference(qkv, dout, 2)[1], "grad_qkv")


def test_pinned_config_refuses_a_foreign_config():
    foreign = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=2)
    with pytest.raises(ValueError, match="is not one of _attn_fwd_kernel's configs"):
        with pinned_config(_TUNED["fwd"], foreign):
            pass


# ---- dropout ----------------------------------------------------------------------------


DROPOUT_CASES = [(2, 33, 2, 16, 0.2), (1, 64, 1, 64, 0.5), (1, 7, 1, 16, 0.9), (1, 1, 1, 16, 0.3)]


@pytest.mark.gpu_first
@pytest.mark.parametrize(
    "backend,case",
    cases(DROPOUT_CASES, cpp=[(2, 37, 3, 20, 0.3)], compiled=[(1, 300, 2, 64, 0.3)]),
    indirect=["backend"],
)
def test_dropout_forward_and_grad_use_the_mask_op(backend, case):
    """out and every gradient equal the reference fed the op's own mask: forward and backward draw
    the same keep-mask and scale survivors by 1/(1-p); lse is taken before dropout."""
    B, T, H, D, p = case
    seed = 2**40 + 12345  # above 2³²: the key's high word matters
    qkv, dout = make_inputs(B, T, H, D)
    out, lse, grad = run(backend, qkv, dout, H, p, seed)
    out_ref, grad_ref = exact_reference(qkv, dout, H, p, mask_of(backend, seed, B, H, T, p))
    assert_close(out, out_ref, "out")
    assert_close(lse, reference_lse(qkv, H), "lse")
    assert_close(grad, grad_ref, "grad_qkv")


def test_dropout_same_seed_is_bit_identical_and_seeds_differ(backend):
    B, T, H, p = 2, 45, 2, 0.2
    qkv, dout = make_inputs(B, T, H, 16)
    first, again, other = (run(backend, qkv, dout, H, p, s) for s in (7, 7, 8))
    for got, want in zip(first, again):
        assert torch.equal(got, want)
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[2], other[2])
    m7, m8, m7_high = (mask_of(backend, s, B, H, T, p)[..., causal(T)] for s in (7, 8, 7 + 2**40))
    assert (m7 != m8).float().mean() > 0.2  # independent masks differ in ~2p(1-p) = 32%
    assert not torch.equal(m7, m7_high)  # the seed's high word is part of the key too
    assert not torch.equal(m7[:, 0], m7[:, 1])  # heads draw different masks


def test_dropout_through_engine_ops_follows_torch_manual_seed(backend):
    qkv = backend.tensor(make_inputs(1, 20, 2, 16)[0])
    torch.manual_seed(11)
    y1 = ops.causal_attention(qkv, 2, 0.25)
    torch.manual_seed(11)
    y2 = ops.causal_attention(qkv, 2, 0.25)
    y3 = ops.causal_attention(qkv, 2, 0.25)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    torch.manual_seed(11)  # the seed engine.ops drew, and the mask it means
    mask = gpt1.attention_dropout_mask(ops.new_seed(qkv, 0.25), 1, 2, 20, 0.25)
    expected = reference.causal_attention(qkv.cpu().double(), 2, 0.25, dropout_mask=mask.cpu())
    assert_close(y1.cpu(), expected.float(), "out")


@pytest.mark.gpu_first
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_and_scaling(backend, p):
    B, H, T = 2, 4, 128
    keep = mask_of(backend, 2024, B, H, T, p)
    assert keep.dtype == torch.bool and keep.shape == (B, H, T, T)
    kept = keep[..., causal(T)].double()
    # 5 binomial standard deviations (false alarm ~6e-7) around the documented drop rate of the
    # 8-bit threshold, q = min(round(p·2⁸), 255) / 2⁸ (FlashAttention-2's; survivors scale by 1/(1−p))
    q = min(round(p * 256), 255) / 256
    n = kept.numel()
    assert abs(kept.mean().item() - (1 - q)) < 5 * math.sqrt(q * (1 - q) / n)
    per_head = kept.view(B * H, -1).mean(1)  # no degenerate head
    assert (per_head - (1 - q)).abs().max().item() < 5 * math.sqrt(q * (1 - q) / (n / (B * H)))
    col_n = (B * H * causal(T).sum(0)).double()  # no stripes: each key column within 6 sigma
    col_rate = keep.double().mul(causal(T)).sum((0, 1, 2)) / col_n
    assert ((col_rate - (1 - q)).abs() / (q * (1 - q) / col_n).sqrt()).max().item() < 6
    # scaling: V = 1 and uniform attention (Q = K = 0) give out_i = Σ_j keep_ij / ((i + 1)(1 − p))
    C = H * 16
    qkv = torch.cat([torch.zeros(B, T, 2 * C), torch.ones(B, T, C)], 2)
    out, _ = gpt1.attention_fwd(backend.tensor(qkv), H, p, backend.seed(2024))
    expected = (keep & causal(T)).double().sum(-1) / (torch.arange(1, T + 1) * (1 - p))  # (B, H, T)
    assert_close(out.cpu().view(B, T, H, 16)[..., 0].transpose(1, 2), expected.float(), "out")


def test_dropout_mask_without_dropout_keeps_everything(backend):
    assert mask_of(backend, 5, 1, 2, 9, 0.0).all()


@pytest.mark.gpu_first
def test_dropout_mask_is_the_documented_philox_draw(backend):
    """keep(b, h, i, j) is tests/philox_ref.py's attention_keep_mask (8-bit draws, 16 per
    Philox4x32-7 call, one accumulator thread's elements), bit for bit."""
    B, H, T, p, seed = 2, 3, 21, 0.35, 2**61 + 987654321
    keep = mask_of(backend, seed, B, H, T, p).numpy()
    bh, i, j = np.meshgrid(np.arange(B * H), np.arange(T), np.arange(T), indexing="ij")
    expected = attention_keep_mask(seed, p, i, j, bh).reshape(B, H, T, T)
    tril = causal(T).numpy()
    assert np.array_equal(keep[..., tril], expected[..., tril])


@pytest.mark.gpu_first
@pytest.mark.parametrize("blocks", [(16, 32), (32, 64), (64, 64)])
def test_triton_mask_does_not_depend_on_its_tiles(blocks):
    pytest.importorskip("triton")
    from gpt1_kernels import attention as kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seed = torch.tensor([2**61 + 987654321], device=device)
    got = kernel._dropout_mask(seed, 2, 3, 21, 0.35, blocks)
    assert torch.equal(got, kernel._dropout_mask(seed, 2, 3, 21, 0.35, kernel._MASK_BLOCKS))


@pytest.mark.cpp
def test_dropout_masks_of_both_backends_are_bit_identical():
    """The cross-backend contract: the C++ and the Triton kernels drop the same elements."""
    pytest.importorskip("triton")
    assert ops.cpu_kernels_error() is None, ops.cpu_kernels_error()
    from gpt1_kernels.attention import attention_dropout_mask as triton_mask

    for seed, B, H, T, p in [(123456789012345, 2, 3, 37, 0.3), (2**62 - 1, 1, 2, 70, 0.1), (5, 1, 1, 1, 0.5)]:
        cpp = gpt1.attention_dropout_mask(CPP.seed(seed), B, H, T, p)  # the C++ CPU kernel
        tri = triton_mask(TRITON.seed(seed), B, H, T, p).cpu()
        assert torch.equal(cpp[..., causal(T)], tri[..., causal(T)])


# ---- the registered op ----------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck(backend, p):
    """Schema, fake kernel, autograd registration and AOT dispatch of all three ops."""
    qkv, dout = (backend.tensor(t) for t in make_inputs(2, 9, 2, 16))
    seed = backend.seed(3) if p > 0 else None
    torch.library.opcheck(gpt1.attention_fwd.default, (qkv.clone().requires_grad_(), 2, p, seed))
    out, lse = gpt1.attention_fwd(qkv, 2, p, seed)
    torch.library.opcheck(gpt1.attention_bwd.default, (dout, qkv, out, lse, 2, p, seed))
    torch.library.opcheck(gpt1.attention_dropout_mask.default, (backend.seed(3), 2, 2, 9, p))


def test_double_backward_raises_a_clear_error(backend):
    qkv = backend.tensor(make_inputs(1, 4, 2, 16)[0]).requires_grad_()
    (grad,) = torch.autograd.grad(ops.causal_attention(qkv, 2).sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match="gpt1::attention_bwd: double backward is not supported"):
        grad.sum().backward()


def test_fused_path_dispatches_the_ops(backend, gpt1_ops_run_by):
    qkv, dout = (backend.tensor(t) for t in make_inputs(1, 8, 2, 16))
    qkv.requires_grad_()
    names = gpt1_ops_run_by(lambda: ops.causal_attention(qkv, 2, 0.1).backward(dout))
    assert names == ["attention_fwd", "attention_bwd"]


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(backend, p):
    qkv = make_inputs(1, 7, 2, 4, torch.float64)[0].requires_grad_()
    seed = backend.seed(42) if p else None  # fixed: the function gradcheck differentiates is deterministic
    assert torch.autograd.gradcheck(lambda t: gpt1.attention_fwd(t, 2, p, seed)[0], [qkv])
    if p == 0:
        assert torch.autograd.gradcheck(lambda t: ops.causal_attention(t, 2), [qkv])


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_cpp_is_deterministic_and_thread_count_independent(backend):
    qkv, dout = make_inputs(2, 150, 3, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # whatever OMP_NUM_THREADS the suite runs under
        first = run(backend, qkv, dout, 3, 0.1, 5)
        torch.set_num_threads(1)
        one_thread = run(backend, qkv, dout, 3, 0.1, 5)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(first, one_thread):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_cpp_reads_qkv_by_strides(backend):
    """C++ takes any row stride (Q/K/V straight out of a wider buffer); Triton refuses it (below)."""
    qkv, _ = make_inputs(2, 20, 2, 16)
    wide = torch.cat([qkv, torch.randn(2, 20, 5)], 2)[..., : qkv.shape[2]]  # row stride 3C + 5
    for got, want in zip(gpt1.attention_fwd(wide, 2, 0.0, None), gpt1.attention_fwd(qkv, 2, 0.0, None)):
        assert torch.equal(got, want)


# ---- bad inputs: one table, the same ValueError on every backend -----------------------------

_Q = make_inputs(1, 4, 2, 16)[0]  # C = 32
_O, _L = torch.zeros(1, 4, 32), torch.zeros(1, 2, 4)
BAD = {  # case → (op, arguments (CPU; moved to the backend's device), pattern both messages match)
    "2-D qkv": ("attention_fwd", (_Q[0], 2, 0.0, None), r"qkv must be .*\(B, T, 3C\).*\(?4, 96"),
    "integer qkv": ("attention_fwd", (_Q.long(), 2, 0.0, None), r"qkv .*must be .*float32.*got .*(Long|int64)"),
    "heads do not divide": ("attention_fwd", (_Q, 5, 0.0, None), r"3C with C divisible by n_head ?= ?5, got 96"),
    "no heads": ("attention_fwd", (_Q, 0, 0.0, None), r"n_head must be .*got 0"),
    "dropout_p = 1": ("attention_fwd", (_Q, 2, 1.0, "seed"), r"dropout_p must be .*in \[0, 1\), got 1"),
    "negative dropout_p": ("attention_fwd", (_Q, 2, -0.5, "seed"), r"dropout_p must be .*in \[0, 1\), got -0\.5"),
    "missing seed": ("attention_fwd", (_Q, 2, 0.1, None), r"dropout_p ?= ?0\.1 > 0 needs a seed.*got None"),
    "int32 seed": (
        "attention_fwd",
        (_Q, 2, 0.1, torch.tensor([1], dtype=torch.int32)),
        r"seed must be an int64 .*(Int|int32)",
    ),
    "seed of two": ("attention_fwd", (_Q, 2, 0.1, torch.tensor([1, 2])), r"seed must be an int64 .*\(?2,?\)?"),
    "grad_out shape": ("attention_bwd", (_O[:, :3], _Q, _O, _L, 2, 0.0, None), r"grad_out must .*shape.*1, 4, 32"),
    "grad_out dtype": (
        "attention_bwd",
        (_O.half(), _Q, _O, _L, 2, 0.0, None),
        r"grad_out must .*(Float|float32).*(Half|float16)",
    ),
    "lse dtype": (
        "attention_bwd",
        (_O, _Q, _O, _L.double(), 2, 0.0, None),
        r"lse must .*(Float|float32).*(Double|float64)",
    ),
    "mask heads": ("attention_dropout_mask", ("seed", 1, 0, 4, 0.5), r"n_head (must be an int )?>= 1.*got (1, )?0"),
    "mask seq_len": (
        "attention_dropout_mask",
        ("seed", 1, 1, -3, 0.5),
        r"seq_len (must be an int )?>= 0.*got (1, 1, )?-3",
    ),
    "mask dropout_p": ("attention_dropout_mask", ("seed", 1, 1, 4, 1.5), r"dropout_p must be .*in \[0, 1\), got 1\.5"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_raise_value_error(backend, case):
    op, args, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern):
        getattr(gpt1, op)(*backend.args(args))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize(
    "qkv,n_head,message",
    [
        (torch.zeros(1, 4, 72), 1, "head_dim = C / n_head = 24 / 1 = 24"),
        (torch.zeros(1, 4, 96).double(), 2, "float64"),
        (torch.zeros(1, 96, 4).transpose(1, 2), 2, "contiguous"),
    ],
    ids=["head_dim 24", "float64", "strided"],
)
def test_triton_refuses_what_only_cpp_takes(backend, qkv, n_head, message):
    """The C++ kernel's extras (any head_dim, float64, row strides) are refused by name on Triton."""
    with pytest.raises(ValueError, match=re.escape(message)):
        gpt1.attention_fwd(backend.tensor(qkv), n_head, 0.0, None)
