"""The fused CPU path under torch.autocast("cpu", torch.bfloat16): the C++ kernels run their GEMMs
in bf16 and keep softmax, LayerNorm statistics and the loss in fp32.

Each op (and a whole tiny GPT1 step) runs three ways on the same fp32 inputs: fused under
autocast, the reference in fp32 (no autocast) and the reference under the same autocast
(PyTorch's own bf16 computation). The fused results must meet the FlashAttention rule against
the fp32 reference, forward and every gradient; the gradients of fp32 leaves (master weights)
come back fp32. Shapes are tiny: on CPUs without native bf16 the bf16 GEMMs are emulated.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from engine import GPT1, GPT1Config, ops
from engine.model import reference
from helpers import assert_close, assert_fa_rule

BF16 = torch.bfloat16
pytestmark = pytest.mark.cpp  # the CPU's autocast, served by the C++ kernels


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def run(fn, leaves, upstream, *args, amp=False):
    """fn(*leaves, *args) and the grads of every leaf, for one shared upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    with autocast() if amp else torch.autocast("cpu", enabled=False):
        out = fn(*leaves, *args)
    out.backward(upstream.to(out.dtype) if upstream is not None else None)
    return out.detach(), [t.grad for t in leaves]


def check_three_ways(fn_fused, fn_ref, leaves, upstream, *args, names):
    """Fused under autocast vs the fp32 reference, by the FA rule against the reference under
    autocast; returns the fused forward output (for dtype checks)."""
    out, grads = run(fn_fused, leaves, upstream, *args, amp=True)
    out_ref, grads_ref = run(fn_ref, [t.float() for t in leaves], upstream, *args)
    out_low, grads_low = run(fn_ref, leaves, upstream, *args, amp=True)
    assert_fa_rule(out, out_ref, out_low, "forward")
    for name, leaf, got, want, low in zip(names, leaves, grads, grads_ref, grads_low):
        assert got.dtype == leaf.dtype, f"{name}: grad dtype {got.dtype} != the leaf's {leaf.dtype}"
        assert_fa_rule(got, want, low, name)
    return out


@pytest.mark.parametrize("B,T,H,D", [(1, 1, 2, 16), (2, 37, 3, 16), (1, 300, 2, 24)])
def test_attention(B, T, H, D):
    g = torch.Generator().manual_seed(0)
    # qkv as the QKV projection gives it under autocast: bf16
    qkv = (1.5 * torch.randn(B, T, 3 * H * D, generator=g)).to(BF16)
    dout = torch.randn(B, T, H * D, generator=g).to(BF16)
    out = check_three_ways(ops.causal_attention, reference.causal_attention, [qkv], dout, H, names=["grad_qkv"])
    assert out.dtype == BF16


@pytest.mark.parametrize("N,C,F", [(1, 16, 8), (37, 48, 100), (130, 64, 256)])
def test_linear_gelu(N, C, F):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, generator=g)  # the fp32 residual stream
    w = torch.randn(F, C, generator=g) * 2.0 / C**0.5  # fp32 master weights
    b = 0.5 * torch.randn(F, generator=g)
    dy = torch.randn(N, F, generator=g)
    out = check_three_ways(
        ops.linear_gelu, reference.linear_gelu, [x, w, b], dy, "tanh", names=["grad_x", "grad_weight", "grad_bias"]
    )
    assert out.dtype == BF16


@pytest.mark.parametrize("N,C,V", [(1, 16, 11), (37, 32, 101), (600, 24, 3000)])  # the last: 3 logit chunks
def test_linear_cross_entropy(N, C, V):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(N, C, generator=g)
    w = torch.randn(V, C, generator=g) * 0.5
    t = torch.randint(0, V, (N,), generator=g)
    t[1::7] = -100  # some ignored targets, never all
    loss = check_three_ways(
        ops.linear_cross_entropy, reference.linear_cross_entropy, [h, w], None, t, names=["grad_hidden", "grad_weight"]
    )
    assert loss.dtype == torch.float32  # the loss stays fp32


@pytest.mark.parametrize("N,C", [(1, 16), (37, 48)])
def test_add_layernorm_stays_fp32_and_reads_the_bf16_residual(N, C):
    # as F.layer_norm under autocast: the fp32 stream x plus a bf16 matmul output r, in fp32
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(N, C, generator=g), torch.randn(N, C, generator=g).to(BF16)
    w, b = 1 + 0.1 * torch.randn(C, generator=g), 0.1 * torch.randn(C, generator=g)
    dy = torch.randn(N, C, generator=g)
    leaves = [x, r, w, b]
    y, grads = run(ops.add_layernorm, leaves, dy, amp=True)
    y_low, grads_low = run(reference.add_layernorm, leaves, dy, amp=True)
    y_ref, grads_ref = run(reference.add_layernorm, [t.float() for t in leaves], dy)
    assert y.dtype == torch.float32
    assert_close(y, y_low, "y")  # both compute in fp32 from the same inputs
    for name, i in (("grad_x", 0), ("grad_weight", 2), ("grad_bias", 3)):
        assert grads[i].dtype == torch.float32
        assert_close(grads[i], grads_low[i], name)
    assert grads[1].dtype == BF16
    assert_fa_rule(grads[1], grads_ref[1], grads_low[1], "grad_residual")


def aten_events(fn, tmp_path) -> list[dict]:
    """The ATen events fn() runs on the calling thread, with input dtypes, from the profiler's trace."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    return [e for e in json.loads(trace.read_text())["traceEvents"] if str(e.get("name", "")).startswith("aten::")]


def gemm_input_dtypes(fn, tmp_path) -> Counter:
    """Counts of (first, second) input dtypes of the ATen GEMMs (mm, addmm) that fn() runs,
    the kernels' own included."""
    return Counter(
        tuple(e["args"]["Input type"][:2])
        for e in aten_events(fn, tmp_path)
        if e["name"] in ("aten::mm", "aten::addmm") and "Input type" in e.get("args", {})
    )


def fwd_bwd(fn, *leaves):
    def run():
        with autocast():
            out = fn(*leaves)
        out.float().sum().backward()

    return run


BF16_PAIR = ("c10::BFloat16", "c10::BFloat16")


@pytest.fixture
def one_thread():
    """The profiler records the ops of the calling thread only: keep at::parallel_for's tasks
    (attention's per-head GEMMs) on it, so every GEMM is counted whatever OMP_NUM_THREADS is."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_the_gemms_run_on_bf16_operands(tmp_path, one_thread):
    g = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(*s, generator=g, requires_grad=True) for s in ((37, 48), (100, 48), (100,)))
    assert gemm_input_dtypes(fwd_bwd(ops.linear_gelu, x, w, b), tmp_path) == Counter({BF16_PAIR: 3})
    h, wv = (
        torch.randn(600, 24, generator=g, requires_grad=True),
        torch.randn(3000, 24, generator=g, requires_grad=True),
    )
    t = torch.randint(0, 3000, (600,), generator=g)
    assert gemm_input_dtypes(fwd_bwd(ops.linear_cross_entropy, h, wv, t), tmp_path) == Counter({BF16_PAIR: 3})


def test_attention_gemms_read_bf16_as_given(tmp_path, one_thread):
    """Attention's GEMMs are brgemm calls on the bf16 qkv and dO themselves (csrc/attention.cpp): no ATen
    GEMM, and no bf16 tensor widened to fp32 on the way (the fp32 copies of qkv and dO it once made)."""
    qkv = torch.randn(2, 37, 3 * 2 * 16, generator=torch.Generator().manual_seed(4)).to(BF16).requires_grad_()

    def run():
        with autocast():
            out = ops.causal_attention(qkv, 2)
        out.sum().backward()  # in bf16: the test itself widens nothing

    events = aten_events(run, tmp_path)
    assert qkv.grad is not None and qkv.grad.dtype == BF16
    assert [e for e in events if e["name"] in ("aten::mm", "aten::addmm", "aten::bmm")] == []
    widened = [
        e for e in events if e["name"] == "aten::copy_" and e["args"]["Input type"][:2] == ["float", "c10::BFloat16"]
    ]
    assert widened == []


CFG = dict(
    n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=101, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)  # dropout off: the fused and reference paths draw different masks


def _step(model, ids, amp, run=None):
    """Loss and every parameter's grad of one forward + backward of `run` (default: model)."""
    model.zero_grad(set_to_none=True)
    with autocast() if amp else torch.autocast("cpu", enabled=False):
        loss = (model if run is None else run)(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_whole_gpt1_step_meets_the_fa_rule_for_the_loss_and_every_gradient():
    torch.manual_seed(0)
    ref = GPT1(GPT1Config(**CFG), fused=False)
    fused = GPT1(GPT1Config(**CFG), fused=True)
    fused.load_state_dict(ref.state_dict())
    ids = torch.randint(0, CFG["vocab_size"], (2, 32))
    loss, grads = _step(fused, ids, amp=True)
    loss_ref, grads_ref = _step(ref, ids, amp=False)
    loss_low, grads_low = _step(ref, ids, amp=True)
    assert loss.dtype == torch.float32
    assert_fa_rule(loss, loss_ref, loss_low, "loss")
    for name, p in fused.named_parameters():
        assert grads[name].dtype == p.dtype == torch.float32, f"{name}: grad {grads[name].dtype}"
        assert_fa_rule(grads[name], grads_ref[name], grads_low[name], f"grad {name}")


def test_torch_compile_fullgraph_traces_under_autocast():
    torch.manual_seed(0)
    model = GPT1(GPT1Config(**CFG), fused=True)
    ids = torch.randint(0, CFG["vocab_size"], (2, 32))
    loss, grads = _step(model, ids, amp=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fake kernels through AOTAutograd
    loss_c, grads_c = _step(model, ids, amp=True, run=compiled)
    assert loss_c.dtype == torch.float32
    assert_close(loss_c, loss, "compiled loss")
    for name in grads:
        assert grads_c[name].dtype == torch.float32
        assert_close(grads_c[name], grads[name], f"compiled grad {name}")
