"""gpt1::linear_gelu_* on every backend against engine.model.reference.linear_gelu.

Triton has two forward implementations (kernels/linear_gelu.py CANDIDATES: a Triton matmul with
a GELU epilogue, and cuBLAS addmm + a Triton GELU), so its backend runs once per candidate.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from backends import Backend, cases, use
from engine import ops
from engine.model import reference
from helpers import assert_close, assert_fa_rule, autograd_reference, exact_reference

GRAD_NAMES = ("grad_x", "grad_weight", "grad_bias")
VARIANTS = ("cpp", "triton-matmul", "triton-cublas")
gpt1 = torch.ops.gpt1
# the interpreter evaluates the tanh form's exp(2z) in numpy, which warns where it is inf (large z:
# tanh → 1 exactly, as on a GPU, where inf is silent)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@pytest.fixture(params=VARIANTS)
def backend(request, monkeypatch) -> Iterator[Backend]:
    """Overrides tests/ops/conftest.py's: Triton once per forward candidate (DEFAULT_IMPL)."""
    name, _, impl = request.param.partition("-")
    with use(name) as be:
        if impl:
            from gpt1_kernels import linear_gelu as kernel

            monkeypatch.setattr(kernel, "DEFAULT_IMPL", {"matmul": "triton", "cublas": "cublas"}[impl])
        yield be


def make_inputs(N, C, F, dtype=torch.float32, seed=0):
    """x, weight, bias (CPU; pre-activations over GELU's curved range) and the one upstream gradient dy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g).to(dtype)
    w = (torch.randn(F, C, generator=g) * 2.0 / C**0.5).to(dtype)  # pre ~ N(0, 4)
    b = (0.5 * torch.randn(F, generator=g)).to(dtype)
    return x, w, b, torch.randn(N, F, generator=g).to(dtype)


def run(backend, x, w, b, dy, approximate):
    """y, pre and (dx, dw, db) through the registered op and its autograd, back on the CPU."""
    leaves = [backend.tensor(t).requires_grad_() for t in (x, w, b)]
    y, pre = gpt1.linear_gelu_fwd(*leaves, approximate)
    y.backward(backend.tensor(dy))
    return y.detach().cpu(), pre.detach().cpu(), [t.grad.cpu() for t in leaves]


# (N, C, F): one row, primes, not powers of two, F = 4C, a partial last tile
SHAPES = [(1, 48, 192), (7, 13, 29), (37, 96, 100), (13, 100, 37), (70, 48, 192), (130, 48, 3)]


@pytest.mark.parametrize(
    "backend,shape", cases(SHAPES, compiled=[(64, 256, 1024)], backends=VARIANTS), indirect=["backend"]
)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_fp32_forward_and_grads(backend, shape, approximate):
    x, w, b, dy = make_inputs(*shape)
    y, pre, grads = run(backend, x, w, b, dy, approximate)
    y_ref, grads_ref = exact_reference(reference.linear_gelu, (x, w, b), dy, approximate)
    assert_close(pre, (x.double() @ w.double().t() + b.double()).float(), "pre")
    assert_close(y, y_ref, "y")
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        assert_close(got, want, name)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gelu_accurate_far_into_the_tails(backend, approximate):
    """Pre-activations from -30 to 30 (x = z, W = I, b = 0): saturation, underflow of exp terms."""
    z = torch.linspace(-30, 30, 601).reshape(-1, 1)
    x, w, b, dy = z, torch.ones(1, 1), torch.zeros(1), torch.ones_like(z)
    y, _, grads = run(backend, x, w, b, dy, approximate)
    y_ref, grads_ref = exact_reference(reference.linear_gelu, (x, w, b), dy, approximate)
    assert_close(y, y_ref, "y")
    assert_close(grads[0], grads_ref[0], "GELU'(z)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("N,C,F", [(37, 96, 100), (5, 48, 37)])
def test_low_precision_fa_rule(backend, dtype, approximate, N, C, F):
    x, w, b, dy = make_inputs(N, C, F, dtype)
    y, _, grads = run(backend, x, w, b, dy, approximate)
    y_ref, grads_ref = autograd_reference(
        reference.linear_gelu, [t.float() for t in (x, w, b)], dy.float(), approximate, upcast=True
    )
    y_low, grads_low = autograd_reference(reference.linear_gelu, (x, w, b), dy, approximate)
    assert y.dtype == dtype
    assert_fa_rule(y, y_ref, y_low, "y")
    for name, got, want, low in zip(GRAD_NAMES, grads, grads_ref, grads_low):
        assert got.dtype == dtype
        assert_fa_rule(got, want, low, name)


def test_strided_inputs_give_the_contiguous_result(backend):
    x, w, b, _ = (backend.tensor(t) for t in make_inputs(12, 40, 30))
    strided = (x.t().contiguous().t(), w.t().contiguous().t(), torch.stack([b, b], 1)[:, 0])  # column-major
    for got, want in zip(gpt1.linear_gelu_fwd(*strided, "tanh"), gpt1.linear_gelu_fwd(x, w, b, "tanh")):
        assert_close(got.cpu(), want.cpu())


@pytest.mark.parametrize("backend", ["triton-matmul", "triton-cublas"], indirect=True)
def test_triton_takes_a_float32_bias_with_low_precision_inputs(backend):
    x, w, b, _ = (backend.tensor(t) for t in make_inputs(9, 48, 192, torch.bfloat16))
    y, _ = gpt1.linear_gelu_fwd(x, w, b.float(), "tanh")
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, gpt1.linear_gelu_fwd(x, w, b, "tanh")[0])  # b is exactly representable in bf16


# ---- the registered op ----------------------------------------------------------------------


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_opcheck(backend, approximate):
    x, w, b, dy = (backend.tensor(t) for t in make_inputs(6, 10, 12))
    torch.library.opcheck(gpt1.linear_gelu_fwd.default, (*(t.clone().requires_grad_() for t in (x, w, b)), approximate))
    _, pre = gpt1.linear_gelu_fwd(x, w, b, approximate)
    torch.library.opcheck(gpt1.linear_gelu_bwd.default, (dy, x, w, pre, approximate))


def test_double_backward_raises_a_clear_error(backend):
    x, w, b, _ = (backend.tensor(t) for t in make_inputs(3, 8, 4))
    x.requires_grad_()
    (grad,) = torch.autograd.grad(ops.linear_gelu(x, w, b).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="gpt1::linear_gelu_bwd: double backward is not supported"):
        grad.sum().backward()


def test_fused_path_dispatches_the_ops(backend, gpt1_ops_run_by):
    x, w, b, dy = (backend.tensor(t) for t in make_inputs(6, 5, 8))
    w.requires_grad_()
    names = gpt1_ops_run_by(lambda: ops.linear_gelu(x.view(2, 3, 5), w, b).backward(dy.view(2, 3, 8)))  # (B, T, C)
    assert names == ["linear_gelu_fwd", "linear_gelu_bwd"]


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gradcheck_float64(backend, approximate):
    args = [t.requires_grad_() for t in make_inputs(3, 5, 4, torch.float64)[:3]]
    assert torch.autograd.gradcheck(lambda *a: ops.linear_gelu(*a, approximate), args)


def test_grad_bias_is_deterministic(backend, monkeypatch):
    """Fixed-order partial sums, no atomics: two runs give the same bits (Triton: few row groups,
    the last partial; C++: any thread count)."""
    if backend.name == "triton":
        from gpt1_kernels import linear_gelu as kernel

        monkeypatch.setattr(kernel, "_MAX_GROUPS", 3)
    x, w, b, dy = make_inputs(150, 40, 70)
    _, _, grads = run(backend, x, w, b, dy, "tanh")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, _, again = run(backend, x, w, b, dy, "tanh")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(got, want) for got, want in zip(grads, again))
    _, grads_ref = exact_reference(reference.linear_gelu, (x, w, b), dy, "tanh")
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref):
        assert_close(got, want, name)


@pytest.mark.parametrize(
    "backend,impl", [("triton-matmul", "triton"), ("triton-cublas", "cublas")], indirect=["backend"]
)
def test_triton_variant_runs_its_candidate(backend, impl, monkeypatch):
    """The op's forward is CANDIDATES[DEFAULT_IMPL], and only it runs (the candidates' results may
    be bitwise equal: on a GPU cuBLAS and the Triton matmul can round alike)."""
    from gpt1_kernels import linear_gelu as kernel

    ran = []

    def spy(name, fwd):
        return lambda *args: ran.append(name) or fwd(*args)

    monkeypatch.setattr(kernel, "CANDIDATES", {name: spy(name, fwd) for name, fwd in kernel.CANDIDATES.items()})
    x, w, b, _ = (backend.tensor(t) for t in make_inputs(7, 48, 37))
    y, pre = gpt1.linear_gelu_fwd(x, w, b, "tanh")
    assert ran == [impl]
    want_y, want_pre = kernel.CANDIDATES[impl](x, w, b, "tanh")
    assert torch.equal(y, want_y) and torch.equal(pre, want_pre)


def _matmul_configs() -> list:
    from gpt1_kernels.linear_gelu import _MATMUL_CONFIGS

    return [
        pytest.param(i, id="{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**c.kwargs) + f"w{c.num_warps}")
        for i, c in enumerate(_MATMUL_CONFIGS)
    ]


@pytest.mark.gpu_first
@pytest.mark.parametrize("index", _matmul_configs())
@pytest.mark.parametrize("backend", ["triton-matmul"], indirect=True)
def test_every_matmul_config_matches_reference(backend, index):
    """Each autotune config of the Triton matmul pinned, at a shape with partial row, column and K
    tiles and several GROUP_M groups (the autotuner runs one config, the interpreter its own
    tile): bf16 forward by the FlashAttention rule; the last config, fp32's, also in fp32."""
    from gpt1_kernels.linear_gelu import _MATMUL_CONFIGS, _matmul_autotuned
    from gpt1_kernels.pinning import pinned_config

    N, C, F = 1100, 96, 300  # C % 64 != 0, F % 128 != 0, N > GROUP_M · 128
    x, w, b, _ = make_inputs(N, C, F, torch.bfloat16)
    fp32_too = index == len(_MATMUL_CONFIGS) - 1
    with pinned_config(_matmul_autotuned, _MATMUL_CONFIGS[index]):
        y, pre = (t.cpu() for t in gpt1.linear_gelu_fwd(*(backend.tensor(t) for t in (x, w, b)), "tanh"))
        if fp32_too:
            y32, pre32 = (
                t.cpu() for t in gpt1.linear_gelu_fwd(*(backend.tensor(t.float()) for t in (x, w, b)), "tanh")
            )
    assert_fa_rule(
        y, reference.linear_gelu(x.float(), w.float(), b.float(), "tanh"), reference.linear_gelu(x, w, b, "tanh"), "y"
    )
    assert_fa_rule(pre, x.float() @ w.float().t() + b.float(), x @ w.t() + b, "pre")
    if fp32_too:
        assert_close(y32, reference.linear_gelu(x.float(), w.float(), b.float(), "tanh"), "y fp32")
        assert_close(pre32, x.float() @ w.float().t() + b.float(), "pre fp32")


@pytest.mark.parametrize("backend", ["triton-matmul"], indirect=True)
def test_triton_refuses_an_unknown_default_impl(backend, monkeypatch):
    from gpt1_kernels import linear_gelu as kernel

    monkeypatch.setattr(kernel, "DEFAULT_IMPL", "cutlass")
    x, w, b, _ = (backend.tensor(t) for t in make_inputs(7, 48, 37))
    with pytest.raises(ValueError, match="DEFAULT_IMPL must be one of"):
        gpt1.linear_gelu_fwd(x, w, b, "tanh")


# ---- bad inputs: one table, the same ValueError on every backend -----------------------------

_X, _W, _B, _DY = make_inputs(4, 8, 6)
_PRE = torch.zeros(4, 6)
BAD = {  # case → (op, arguments (CPU; moved to the backend's device), pattern both messages match)
    "1-D x": ("linear_gelu_fwd", (_X[0], _W, _B, "tanh"), r"x must be 2-D \(N, C"),
    "integer x": ("linear_gelu_fwd", (_X.long(), _W.long(), _B, "tanh"), r"x must be .*float32.*(Long|int64)"),
    "weight width": ("linear_gelu_fwd", (_X, _W[:, :7], _B, "tanh"), r"weight must .*\(F, 8\).*6, 7"),
    "weight dtype": (
        "linear_gelu_fwd",
        (_X, _W.double(), _B, "tanh"),
        r"weight must .*(Float|float32).*(Double|float64)",
    ),
    "bias shape": ("linear_gelu_fwd", (_X, _W, _B[:5], "tanh"), r"bias must .*6.*got.*5"),
    "approximate": ("linear_gelu_fwd", (_X, _W, _B, "erf"), r"approximate must be 'tanh' or 'none', got 'erf'"),
    "grad_y shape": ("linear_gelu_bwd", (_DY[:, :5], _X, _W, _PRE, "tanh"), r"grad_y must .*4, 6.*4, 5"),
    "pre dtype": ("linear_gelu_bwd", (_DY, _X, _W, _PRE.half(), "tanh"), r"pre must .*(Float|float32).*(Half|float16)"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_raise_value_error(backend, case):
    op, args, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern):
        getattr(gpt1, op)(*backend.args(args))
