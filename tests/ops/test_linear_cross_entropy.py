"""gpt1::linear_cross_entropy_fwd on every backend against engine.model.reference.linear_cross_entropy.

The op returns the gradients of the mean loss with its forward (the logits never exist whole);
register_autograd scales them by the upstream gradient, which the tests check too.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from backends import TRITON, cases
from engine import ops
from engine.model import reference
from helpers import assert_close, assert_fa_rule, autograd_reference, compile_for_sm90, exact_reference

IGNORE = -100
gpt1 = torch.ops.gpt1


def make_inputs(N, C, V, dtype=torch.float32, n_ignored=2, seed=0):
    """hidden, weight (logits of a few units: a non-trivial softmax) and int64 targets (CPU), a few
    of them (never all) ignore_index."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g).to(dtype)
    weight = (torch.randn(V, C, generator=g) * 2.0 / math.sqrt(C)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[: min(n_ignored, N - 1)]] = IGNORE
    return hidden, weight, targets


def run(backend, hidden, weight, targets, ignore_index=IGNORE, upstream=1.0):
    """loss and (grad_hidden, grad_weight) of upstream·loss through engine.ops, back on the CPU."""
    h, w = (backend.tensor(t).requires_grad_() for t in (hidden, weight))
    loss = ops.linear_cross_entropy(h, w, backend.tensor(targets), ignore_index)
    (loss * upstream).backward()
    return loss.detach().cpu(), (h.grad.cpu(), w.grad.cpu())


def reference_of(hidden, weight, targets, ignore_index=IGNORE, exact=True, **kwargs):
    fn = exact_reference if exact else autograd_reference
    return fn(
        lambda h, w: reference.linear_cross_entropy(h, w, targets, ignore_index, **kwargs), (hidden, weight), None
    )


# (N, C, V): one row, primes, V not a power of two (partial last vocabulary block); C++ chunks its
# logits by 256+ rows, so its multi-chunk cases are large: GPT-1's V = 40478, and V = 4099
SHAPES = [(1, 16, 13), (37, 48, 257), (13, 96, 1009)]
COMPILED = [(64, 96, 1000), (450, 16, 40478), (1100, 16, 4099)]


@pytest.mark.parametrize("backend,shape", cases(SHAPES, compiled=COMPILED), indirect=["backend"])
def test_fp32_loss_and_grads(backend, shape):
    hidden, weight, targets = make_inputs(*shape)
    loss, (grad_h, grad_w) = run(backend, hidden, weight, targets, upstream=2.5)
    loss_ref, (grad_h_ref, grad_w_ref) = reference_of(hidden, weight, targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, loss_ref, "loss")
    assert_close(grad_h, 2.5 * grad_h_ref, "grad_hidden")  # scaled by the upstream gradient
    assert_close(grad_w, 2.5 * grad_w_ref, "grad_weight")


@pytest.mark.gpu_first
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_cuda_block_width(backend, monkeypatch):
    """The GPU's BLOCK_V (4096 columns per step, 8 warps), which the interpreter never takes by
    itself: V = 9001 spans two full blocks and a partial one, and the padding past V."""
    from gpt1_kernels import linear_cross_entropy as kernel

    monkeypatch.setattr(kernel, "_BLOCK_V_INTERPRETER", kernel._BLOCK_V_CUDA)
    assert kernel.chunk_launch(9001, cuda=False) == kernel.chunk_launch(9001, cuda=True)
    hidden, weight, targets = make_inputs(6, 16, 9001)
    loss, (grad_h, grad_w) = run(backend, hidden, weight, targets)
    loss_ref, (grad_h_ref, grad_w_ref) = reference_of(hidden, weight, targets)
    assert_close(loss, loss_ref, "loss")
    assert_close(grad_h, grad_h_ref, "grad_hidden")
    assert_close(grad_w, grad_w_ref, "grad_weight")


@pytest.mark.gpu_first
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize(
    "rows,dtype", [(1, torch.float32), (5, torch.float32), (8, torch.bfloat16), (8, torch.float16)]
)
def test_triton_chunks_accumulate_the_same_gradients(backend, monkeypatch, rows, dtype):
    """Chunks of `rows` rows (CHUNK_BYTES shrunk): grad_weight sums over chunks in float32."""
    from gpt1_kernels import linear_cross_entropy as kernel

    hidden, weight, targets = make_inputs(29, 48, 1009, dtype, n_ignored=3)
    monkeypatch.setattr(kernel, "CHUNK_BYTES", rows * 1009 * hidden.element_size())
    loss, grads = run(backend, hidden, weight, targets)
    if dtype == torch.float32:
        loss_ref, grads_ref = reference_of(hidden, weight, targets)
        assert_close(loss, loss_ref, "loss")
        for name, got, want in zip(("grad_hidden", "grad_weight"), grads, grads_ref):
            assert_close(got, want, name)
        return
    _, grads_ref = reference_of(hidden.float(), weight.float(), targets, exact=False, upcast=True)
    _, grads_low = reference_of(hidden, weight, targets, exact=False)
    for name, got, want, low in zip(("grad_hidden", "grad_weight"), grads, grads_ref, grads_low):
        assert_fa_rule(got, want, low, name)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_refuses_chunks_of_no_rows(backend):
    from gpt1_kernels.linear_cross_entropy import linear_cross_entropy_fwd

    hidden, weight, targets = (backend.tensor(t) for t in make_inputs(4, 8, 10))
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        linear_cross_entropy_fwd(hidden, weight, targets, IGNORE, True, chunk_rows=0)


def test_ignore_index_inside_the_vocabulary(backend):
    """ignore_index = 0 is also a class id: rows targeting 0 are the ignored ones."""
    hidden, weight, targets = make_inputs(11, 48, 257, n_ignored=0)
    targets[[2, 7]] = 0
    loss, (grad_h, grad_w) = run(backend, hidden, weight, targets, 0)
    loss_ref, (grad_h_ref, grad_w_ref) = reference_of(hidden, weight, targets, 0)
    assert_close(loss, loss_ref, "loss")
    assert_close(grad_h, grad_h_ref, "grad_hidden")
    assert_close(grad_w, grad_w_ref, "grad_weight")
    assert grad_h[2].abs().max() == 0 and grad_h[7].abs().max() == 0  # ignored rows get no gradient


def test_without_grad_returns_the_loss_and_empty_tensors(backend):
    hidden, weight, targets = (backend.tensor(t) for t in make_inputs(9, 48, 101))
    loss, grad_h, grad_w = gpt1.linear_cross_entropy_fwd(hidden, weight, targets, IGNORE, False)
    assert grad_h.numel() == 0 and grad_w.numel() == 0
    assert_close(loss.cpu(), reference_of(hidden.cpu(), weight.cpu(), targets.cpu())[0], "loss")
    with torch.no_grad():  # engine.ops asks for no gradients where autograd will not want them
        assert torch.equal(ops.linear_cross_entropy(hidden, weight.requires_grad_(), targets), loss)


def test_all_targets_ignored_gives_nan_loss_and_zero_grads(backend):
    hidden, weight, targets = make_inputs(5, 16, 23)
    targets[:] = IGNORE
    loss, (grad_h, grad_w) = run(backend, hidden, weight, targets)
    loss_ref, (grad_h_ref, grad_w_ref) = reference_of(hidden, weight, targets, exact=False)
    assert torch.isnan(loss) and torch.isnan(loss_ref)
    assert torch.equal(grad_h, grad_h_ref) and torch.equal(grad_w, grad_w_ref)  # zeros, as F.cross_entropy
    assert grad_h.abs().max() == 0 and grad_w.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N,C,V", [(29, 96, 1009), (37, 96, 1000)])
def test_low_precision_fa_rule(backend, dtype, N, C, V):
    hidden, weight, targets = make_inputs(N, C, V, dtype)
    loss, grads = run(backend, hidden, weight, targets)
    loss_ref, grads_ref = reference_of(hidden.float(), weight.float(), targets, exact=False, upcast=True)
    loss_low, grads_low = reference_of(hidden, weight, targets, exact=False)
    assert loss.dtype == torch.float32
    assert_fa_rule(loss, loss_ref, loss_low, "loss")
    for name, got, want, low in zip(("grad_hidden", "grad_weight"), grads, grads_ref, grads_low):
        assert got.dtype == dtype
        assert_fa_rule(got, want, low, name)


def test_strided_inputs_give_the_contiguous_result(backend):
    hidden, weight, targets = (backend.tensor(t) for t in make_inputs(12, 40, 30))
    strided = (hidden.t().contiguous().t(), weight.t().contiguous().t(), torch.stack([targets, targets], 1)[:, 0])
    for got, want in zip(
        gpt1.linear_cross_entropy_fwd(*strided, IGNORE, True),
        gpt1.linear_cross_entropy_fwd(hidden, weight, targets, IGNORE, True),
    ):
        assert_close(got.cpu(), want.cpu())


# ---- the registered op ----------------------------------------------------------------------


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck(backend, compute_grad):
    hidden, weight, targets = (backend.tensor(t) for t in make_inputs(6, 10, 17))
    args = (hidden.requires_grad_(), weight.requires_grad_(), targets, IGNORE, compute_grad)
    # without grads the op has no derivative, so the autograd checks do not apply
    kwargs = {} if compute_grad else {"test_utils": ("test_schema", "test_faketensor")}
    torch.library.opcheck(gpt1.linear_cross_entropy_fwd.default, args, **kwargs)


def test_double_backward_raises_a_clear_error(backend):
    hidden, weight, targets = (backend.tensor(t) for t in make_inputs(6, 8, 11))
    hidden.requires_grad_()
    with pytest.raises(RuntimeError, match="gpt1::linear_cross_entropy_fwd: double backward is not supported"):
        torch.autograd.grad(ops.linear_cross_entropy(hidden, weight, targets), hidden, create_graph=True)


def test_fused_path_dispatches_the_op(backend, gpt1_ops_run_by):
    hidden, weight, targets = (backend.tensor(t) for t in make_inputs(6, 8, 11))
    weight.requires_grad_()
    names = gpt1_ops_run_by(
        lambda: ops.linear_cross_entropy(hidden.view(2, 3, 8), weight, targets.view(2, 3)).backward()
    )
    assert names == ["linear_cross_entropy_fwd"]  # the gradients come out of the forward


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_float64_grads_and_gradcheck(backend):
    hidden, weight, targets = make_inputs(6, 5, 7, torch.float64)
    _, (grad_h, grad_w) = run(backend, hidden, weight, targets)
    _, (grad_h_ref, grad_w_ref) = reference_of(hidden, weight, targets, exact=False)
    assert grad_h.dtype == torch.float64
    assert_close(grad_h, grad_h_ref, "grad_hidden")
    assert_close(grad_w, grad_w_ref, "grad_weight")
    # The loss is float32 by contract (even for float64 inputs), so finite differences must be
    # wide enough to resolve it: eps = 1e-3 gives derivative noise of ~ulp(loss)/eps ≈ 5e-4 and
    # truncation error ~eps² ≈ 1e-6; a wrong formula is off by O(0.1).
    args = [hidden.requires_grad_(), weight.requires_grad_()]
    assert torch.autograd.gradcheck(
        lambda h, w: ops.linear_cross_entropy(h, w, targets), args, eps=1e-3, atol=2e-3, rtol=1e-3
    )


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
def test_cpp_result_is_thread_count_independent(backend):
    """The loss is the per-row losses summed in row order: the same bits on 2 threads and on 1.
    (The gradients are MKL GEMMs, whose own blocking may follow the thread count.)"""
    hidden, weight, targets = make_inputs(300, 32, 5000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two_threads = gpt1.linear_cross_entropy_fwd(hidden, weight, targets, IGNORE, True)
        torch.set_num_threads(1)
        one_thread = gpt1.linear_cross_entropy_fwd(hidden, weight, targets, IGNORE, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(two_threads[0], one_thread[0])


# ---- bad inputs: one table, the same ValueError on every backend -----------------------------

_H, _W, _T = make_inputs(4, 8, 10)
BAD = {  # case → (arguments (CPU; moved to the backend's device), pattern both messages match)
    "target too large": (
        (_H, _W, torch.tensor([1, 10, 2, 3]), IGNORE, True),
        r"targets\[1\] = 10 .*\[0, 10\).*ignore_index ?= ?-100|\[0, 10\).*-100.*targets\[1\] = 10",
    ),
    "negative target": ((_H, _W, torch.tensor([1, 2, -1, 3]), IGNORE, False), r"targets\[2\] = -1"),
    "int32 targets": ((_H, _W, _T.int(), IGNORE, True), r"targets must .*(Long|int64).*(Int|int32)"),
    "targets length": ((_H, _W, _T[:3], IGNORE, True), r"targets must .*shape.*4.*3"),
    "weight width": ((_H, _W[:, :7], _T, IGNORE, True), r"weight must .*\(V.*, 8\).*10, 7"),
    "weight dtype": ((_H, _W.double(), _T, IGNORE, True), r"weight must .*(Float|float32).*(Double|float64)"),
    "3-D hidden": ((_H.view(2, 2, 8), _W, _T, IGNORE, True), r"hidden must be 2-D \(N, C.*2, 2, 8"),
    "integer hidden": ((_H.long(), _W.long(), _T, IGNORE, True), r"hidden must be .*float32.*(Long|int64)"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_raise_value_error(backend, case):
    args, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern):
        gpt1.linear_cross_entropy_fwd(*backend.args(args))


# ---- the float32-output GEMMs: each path the capability probe may choose ---------------------

REAL_ADDMM, REAL_MM = torch.addmm, torch.mm


def _fp32_gemm(real, *args, out_dtype=None, out=None, **kwargs):
    """What CUDA's out_dtype GEMMs compute, on any device: low-precision products are exact in
    float32, and the sum is float32."""
    result = real(*(a.to(out_dtype) for a in args), **kwargs)
    return result if out is None else out.copy_(result)


def _torch_that(accumulates: bool, fp32_mm: bool, ran: list):
    """torch.addmm and torch.mm of a torch that runs (or refuses, as older ones did) the
    float32-output calls the LM head makes; each float32-output call that runs is listed in `ran`."""

    def addmm(*args, out_dtype=None, **kwargs):
        if out_dtype is None:
            return REAL_ADDMM(*args, **kwargs)
        if not accumulates:  # CUDA before pytorch#167931, with a float32 self
            raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")
        ran.append("addmm")
        return _fp32_gemm(REAL_ADDMM, *args, out_dtype=out_dtype, **kwargs)

    def mm(*args, out_dtype=None, **kwargs):
        if out_dtype is None:
            return REAL_MM(*args, **kwargs)
        if not fp32_mm:  # torch < 2.8
            raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")
        ran.append("mm")
        return _fp32_gemm(REAL_MM, *args, out_dtype=out_dtype, **kwargs)

    return addmm, mm


@pytest.fixture
def probe_afresh():
    """fp32_output re-probed inside the test and again after it (its answers are cached)."""
    from gpt1_kernels.linear_cross_entropy import fp32_output

    fp32_output.cache_clear()
    yield fp32_output
    fp32_output.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_output_probe_says_what_this_torch_runs(probe_afresh, dtype):
    """On this torch and device, each call the probe allows runs and gives float32; each it
    refuses raises (on CPU builds both, which have no out_dtype kernels)."""
    device = TRITON.device.type
    a, b = torch.ones(4, 3, dtype=dtype, device=device), torch.ones(3, 5, dtype=dtype, device=device)
    can = probe_afresh(device, dtype)
    acc = torch.zeros(4, 5, device=device)
    for allowed, call in (
        (can.addmm, lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)),
        (can.mm, lambda: torch.mm(a, b, out_dtype=torch.float32)),
    ):
        if allowed:
            assert call().dtype == torch.float32
        else:
            with pytest.raises((RuntimeError, TypeError)):
                call()


@pytest.mark.gpu_first
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize(
    "accumulates,fp32_mm", [(True, True), (False, True), (False, False)], ids=["in-place", "temporary", "rounded"]
)
def test_every_accumulation_path_meets_the_fa_rule(backend, monkeypatch, probe_afresh, accumulates, fp32_mm):
    """The LM head on a torch that accumulates into float32 in place (new CUDA), one that refuses a
    float32 self (CUDA before late 2025: through an unrounded temporary) and one without out_dtype
    (torch < 2.8, CPU: rounded once per chunk): the probe picks the path, and bf16 gradients over
    several chunks meet the FlashAttention rule on each."""
    from gpt1_kernels import linear_cross_entropy as kernel

    ran = []
    addmm, mm = _torch_that(accumulates, fp32_mm, ran)
    monkeypatch.setattr(torch, "addmm", addmm)
    monkeypatch.setattr(torch, "mm", mm)
    assert probe_afresh(backend.device.type, torch.bfloat16) == (accumulates, fp32_mm)
    hidden, weight, targets = make_inputs(29, 48, 257, torch.bfloat16, n_ignored=3)
    monkeypatch.setattr(kernel, "CHUNK_BYTES", 8 * kernel.chunk_launch(257, False)["LD"] * 2)  # 8 rows: 4 chunks
    ran.clear()  # the probe's own calls
    _, grads = run(backend, hidden, weight, targets)
    # per chunk: grad_W by the chosen path, grad_hidden by mm with or without a float32 output
    expected = {(True, True): ["mm", "addmm"], (False, True): ["mm", "mm"], (False, False): []}
    assert ran == expected[accumulates, fp32_mm] * 4
    _, grads_ref = reference_of(hidden.float(), weight.float(), targets, exact=False, upcast=True)
    _, grads_low = reference_of(hidden, weight, targets, exact=False)
    for name, got, want, low in zip(("grad_hidden", "grad_weight"), grads, grads_ref, grads_low):
        assert_fa_rule(got, want, low, name)


# ---- the race between the loss and pass 2 (a GPU-only hazard, checked on the sm_90a compile) ----

_CE_TTGIR = r"""
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from engine._kernels import kernels_package
kernels_package()
from gpt1_kernels import linear_cross_entropy as L
launch = L.chunk_launch(40478, cuda=True)
signature = {"logits_ptr": "*bf16", "targets_ptr": "*i64", "loss_ptr": "*fp32", "ignore_index": "i32"}
constexprs = {"V": 40478, "LD": launch["LD"], "WRITE_GRAD": True, "BLOCK_V": launch["BLOCK_V"]}
compiled = triton.compile(ASTSource(fn=L._cross_entropy_chunk_kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=launch["num_warps"]))
print(compiled.asm["ttgir"])
"""


@pytest.mark.offline
def test_the_target_logit_is_read_before_any_warp_overwrites_it():
    """Pass 2 overwrites the row in place, logits[target] with p - 1, and warps run it
    independently; the loss reads logits[target] once, after pass 1. The GPU's TTGIR (8 warps at
    GPT-1's V) must put a CTA barrier between that read and pass 2's first store, or another warp
    could store first (the interpreter, one block at a time, can never show it)."""
    lines = compile_for_sm90(_CE_TTGIR).splitlines()
    scalar_reads = [i for i, line in enumerate(lines) if re.search(r"tt\.load .*: !tt\.ptr<bf16>", line)]
    row_writes = [i for i, line in enumerate(lines) if re.search(r"tt\.store .*tensor<\d+x!tt\.ptr<bf16>", line)]
    barriers = [i for i, line in enumerate(lines) if "gpu.barrier" in line]
    assert len(scalar_reads) == 1 and row_writes, "\n".join(lines)
    read, first_write = scalar_reads[0], min(row_writes)
    assert read < first_write
    assert any(read < b < first_write for b in barriers), (
        f"no barrier between the target logit's read (TTGIR line {read}) and pass 2's first store ({first_write})"
    )
