"""Per-op benchmarks: reference eager, torch.compile(reference), fused (and SDPA for attention)
× fwd / bwd / fwd+bwd, at the small preset's training shapes; the two ops that carry GPT-1's
dropout also with p = 0.1, as in training (the fused kernels draw the mask in-kernel, eager
draws and stores it). The "-bf16" providers run the same three under
torch.autocast("cpu", torch.bfloat16), with the inputs in the dtypes the model gives each op
there: qkv and the residual branch bf16 (matmul outputs), the stream and the weights fp32.

Units: attention in GFLOP/s by FlashAttention's formula (fwd 4·B·T²·H·D, halved when causal;
bwd 2.5× fwd); add+LayerNorm in GB/s of compulsory traffic; the matmul ops in GFLOP/s. Rates count
fp32 bytes for every provider (so GB/s compares as 1/time).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import ops
from engine.model import reference

from .conftest import SHAPES, fused_cpu_error, median_seconds

S = SHAPES
MODES = ["fwd", "bwd", "fwd+bwd"]
PROVIDERS = ["eager", "compile", "fused"]
BF16_PROVIDERS = [f"{p}-bf16" for p in PROVIDERS]
BF16 = torch.bfloat16


def _make_attention(p: float, bf16: bool = False):
    qkv = torch.randn(S.B, S.T, 3 * S.C, dtype=BF16 if bf16 else torch.float32, requires_grad=True)
    return (qkv,), dict(n_head=S.H, dropout_p=p)


def _make_add_layernorm(p: float, bf16: bool = False):
    x = torch.randn(S.N, S.C, requires_grad=True)
    r = torch.randn(S.N, S.C, dtype=BF16 if bf16 else torch.float32, requires_grad=True)
    w = torch.randn(S.C, requires_grad=True)
    b = torch.randn(S.C, requires_grad=True)
    return (x, r, w, b), dict(eps=1e-5, dropout_p=p)


def _make_linear_gelu(p: float, bf16: bool = False):
    x = torch.randn(S.N, S.C, requires_grad=True)
    w = (torch.randn(S.F, S.C) * 0.02).requires_grad_()
    b = torch.zeros(S.F, requires_grad=True)
    return (x, w, b), {}


def _make_linear_cross_entropy(p: float, bf16: bool = False):
    h = torch.randn(S.N, S.C, requires_grad=True)
    w = (torch.randn(S.V, S.C) * 0.02).requires_grad_()
    t = torch.randint(0, S.V, (S.N,))
    return (h, w, t), {}


_ATTN_FWD_FLOP = 4 * S.B * S.T * S.T * S.H * (S.C // S.H) / 2  # causal
_WORK = {  # op → (fwd work, bwd work, unit)
    "causal_attention": (_ATTN_FWD_FLOP / 1e9, 2.5 * _ATTN_FWD_FLOP / 1e9, "GFLOP/s"),
    # fwd reads x, r, writes y; bwd reads dy, x, r, writes dx (= dr): fp32 bytes
    "add_layernorm": (3 * S.N * S.C * 4 / 1e9, 4 * S.N * S.C * 4 / 1e9, "GB/s"),
    "linear_gelu": (2 * S.N * S.C * S.F / 1e9, 4 * S.N * S.C * S.F / 1e9, "GFLOP/s"),
    "linear_cross_entropy": (2 * S.N * S.C * S.V / 1e9, 4 * S.N * S.C * S.V / 1e9, "GFLOP/s"),
}
_MAKE = {
    "causal_attention": _make_attention,
    "add_layernorm": _make_add_layernorm,
    "linear_gelu": _make_linear_gelu,
    "linear_cross_entropy": _make_linear_cross_entropy,
}


def _sdpa(qkv, n_head, dropout_p):
    B, T, C3 = qkv.shape
    q, k, v = (t.view(B, T, n_head, -1).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    return out.transpose(1, 2).reshape(B, T, C3 // 3)


def _provider_fn(op: str, provider: str):
    if provider.endswith("-bf16"):
        fn = _provider_fn(op, provider.removesuffix("-bf16"))

        def under_autocast(*args, **kwargs):
            with torch.autocast("cpu", dtype=BF16):
                return fn(*args, **kwargs)

        return under_autocast
    if provider == "fused":
        if fused_cpu_error():
            pytest.skip(fused_cpu_error())
        return getattr(ops, op)
    if provider == "sdpa":
        return _sdpa
    fn = getattr(reference, op)
    return torch.compile(fn) if provider == "compile" else fn


def _time(benchmark, fn, setup, rounds: int) -> float:
    benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=2)
    return median_seconds(benchmark)


_WITH_DROPOUT = [(op, 0.0) for op in _MAKE] + [("causal_attention", 0.1), ("add_layernorm", 0.1)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS + ["sdpa"] + BF16_PROVIDERS)
@pytest.mark.parametrize("op,p", _WITH_DROPOUT, ids=[f"{op}-p{p}" for op, p in _WITH_DROPOUT])
def test_op(benchmark, record, op, p, provider, mode):
    if provider == "sdpa" and op != "causal_attention":
        pytest.skip("SDPA is a baseline for attention only")
    fn = _provider_fn(op, provider)
    args, kwargs = _MAKE[op](p, bf16=provider.endswith("-bf16"))
    grad_args = [a for a in args if a.requires_grad]
    group = f"{op} {mode}" + (f" dropout {p}" if p else "")
    benchmark.group = group

    def forward():
        return fn(*args, **kwargs)

    upstream = torch.randn_like(forward().detach())  # one shared upstream gradient

    def clear_grads():
        for a in grad_args:
            a.grad = None

    def setup_bwd():
        clear_grads()
        return (forward(),), {}

    def setup_fwd_bwd():
        clear_grads()
        return (), {}

    if mode == "fwd":
        with torch.no_grad():
            seconds = _time(benchmark, forward, None, rounds=10)
        work = _WORK[op][0]
    elif mode == "bwd":
        seconds = _time(benchmark, lambda out: out.backward(upstream), setup_bwd, rounds=10)
        work = _WORK[op][1]
    else:
        seconds = _time(benchmark, lambda: forward().backward(upstream), setup_fwd_bwd, rounds=10)
        work = _WORK[op][0] + _WORK[op][1]
    record(group, provider, seconds, work, _WORK[op][2])
