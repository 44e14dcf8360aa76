"""One-shot GPU check: correctness of every fused op and of a full GPT-1 step, then timings.

    python bench/gpu_check.py                  # on the GPU machine (budget: 6 minutes on an H200)
    python bench/gpu_check.py --smoke          # tiny shapes on CPU through the Triton
                                               # interpreter: checks this script itself

(a) Correctness, bf16 against the fp32 reference by the FlashAttention rule (error of the
    fused op ≤ 2× the error of PyTorch's own bf16 computation): each op's output and every
    gradient; dropout masks regenerated identically in backward; a full GPT-1 (117M)
    training step's loss and gradients.
(b) Timings, side by side in one run: attention fwd / bwd / fwd+bwd in TFLOP/s
    (FlashAttention's formula: fwd 4·B·T²·H·D, halved when causal; bwd 2.5× fwd) against
    scaled_dot_product_attention; add+LayerNorm fwd+bwd in GB/s against eager and a
    device-to-device copy; the FFN's first projection (both candidates) against the matmul
    alone; the training step (B×T = 32×512, bf16 autocast, fused AdamW) in tokens/s, MFU and
    peak memory for fused, reference eager and torch.compile(reference).
(c) The CUDA test suite (pytest tests/ops on CUDA tensors) under TEST_CAP_S.
The low-precision rule is tests/helpers.py's, its floor relative to each tensor's own scale, and
each op's first gradient is also fed to it as zeros, which must fail. MFU is engine/training/flops.py's
(as engine/training/trainer.py logs it); peak memory is taken before do_bench's L2-flush buffer exists.
Prints a table and writes one JSON (default bench/results/<device>-<date>.json).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_CAP_S = 150  # wall-clock cap of the CUDA test suite run (the whole script: ≤ 6 min on an H200)
CUDA_TESTS = ["tests/ops"]  # the kernel tests, device-parametrised: CUDA tensors where there is a GPU
PARTS = ("ops", "dropout", "model", "attention", "layernorm", "ffn", "step", "tests")  # main() runs them in this order


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1 (tests this script)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<device>-<date>.json)")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile(reference) step")
    p.add_argument("--skip-tests", action="store_true", help="leave out the CUDA test suite run")
    p.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        metavar="PART",
        help=f"run only these parts (to rerun what failed): {', '.join(PARTS)}",
    )
    return p.parse_args()


ARGS = _parse()
if ARGS.smoke:  # before triton or engine are imported
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["GPT1_CPU_KERNELS"] = "triton"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/helpers.py: the tolerances, in one place
from engine._kernels import kernels_package  # noqa: E402

kernels_package()  # gpt1_kernels, installed or this checkout's kernels/

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine import GPT1, GPT1Config, ops  # noqa: E402
from engine.model import reference  # noqa: E402
from engine.training.flops import flops_per_token, mfu, peak_bf16_flops  # noqa: E402
from helpers import FA_FLOOR, FA_SLACK  # noqa: E402

DEV = "cpu" if ARGS.smoke else "cuda"
BF16 = torch.bfloat16
RESULTS: dict = {"checks": {}, "timings": {}, "errors": []}


# ---- helpers -----------------------------------------------------------------------------


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def fa_ok(fused: torch.Tensor, ref32: torch.Tensor, pt_lowp: torch.Tensor) -> tuple[bool, dict]:
    """tests/helpers.py's rule: err(fused) ≤ FA_SLACK·err(PyTorch low precision) + a floor of one
    ulp at the tensor's own scale (FA_FLOOR · max|ref|: relative, so a gradient of 1e-4 gets a
    floor of ~4e-7, and an all-zero one fails)."""
    e, base = err(fused, ref32), err(pt_lowp, ref32)
    tol = FA_SLACK * base + FA_FLOOR.get(fused.dtype, FA_FLOOR[BF16]) * ref32.double().abs().max().item()
    ok = bool(torch.isfinite(fused.float()).all()) and e <= tol
    return ok, dict(err=e, pytorch_lowp_err=base, tol=tol, ok=ok)


def fa_rule(name: str, fused: torch.Tensor, ref32: torch.Tensor, pt_lowp: torch.Tensor) -> bool:
    """Records and returns fa_ok."""
    ok, row = fa_ok(fused, ref32, pt_lowp)
    RESULTS["checks"][name] = row
    return ok


def bench(fn, rounds: int = 20) -> float:
    """Median seconds of fn(); CUDA: triton.testing.do_bench (L2 flushed, synchronised)."""
    if DEV == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    ts = []
    for _ in range(max(2, rounds // 10)):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def section(name: str):
    """Runs one part of the check; an exception is recorded and the rest still runs."""

    def wrap(fn):
        def run():
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 — keep going, report at the end
                RESULTS["errors"].append(f"{name}: {type(e).__name__}: {e}")
                traceback.print_exc()
            print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)

        return run

    return wrap


def grads_of(fn, inputs, upstream):
    for t in inputs:
        t.grad = None
    out = fn()
    out.backward(upstream)
    return out.detach(), [t.grad.detach().clone() for t in inputs]


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


# ---- (a) correctness ---------------------------------------------------------------------

# attention at the timing shape (B, T below): the autotuner's choice made here is the one timed
S = (
    dict(B=2, T=67, H=2, D=16, C=48, F=192, N=67, V=211)
    if ARGS.smoke
    else dict(B=32, T=512, H=12, D=64, C=768, F=3072, N=2048, V=40478)
)


def check_op(name, fused_fn, ref_fn, make_inputs, grads: bool = True):
    """fused in bf16 vs reference in fp32 (upcast) and reference in bf16, out and every grad
    (out only if not grads). The first gradient is also fed to the rule as all zeros, which
    must fail: the check cannot pass by accident."""
    torch.manual_seed(0)
    base = make_inputs()
    lowp = [leaf(t.to(BF16)) if t.is_floating_point() else t for t in base]
    full = [leaf(t.float()) if t.is_floating_point() else t for t in base]
    diff = [i for i, t in enumerate(base) if t.is_floating_point()]
    out_probe = ref_fn(*full)
    upstream = torch.randn_like(out_probe.float())
    lowp2 = [leaf(t.to(BF16)) if t.is_floating_point() else t for t in base]
    if not grads:
        with torch.no_grad():
            fa_rule(f"{name} out", fused_fn(*lowp), ref_fn(*full), ref_fn(*lowp2))
        return
    up_lowp = upstream.to(BF16) if out_probe.ndim else upstream
    out_f, g_f = grads_of(lambda: fused_fn(*lowp), [lowp[i] for i in diff], up_lowp)
    out_r, g_r = grads_of(lambda: ref_fn(*full), [full[i] for i in diff], upstream)
    out_p, g_p = grads_of(lambda: ref_fn(*lowp2), [lowp2[i] for i in diff], up_lowp)
    fa_rule(f"{name} out", out_f, out_r, out_p)
    for k, (a, b, c) in enumerate(zip(g_f, g_r, g_p)):
        fa_rule(f"{name} grad[{diff[k]}]", a, b, c)
    zero_ok, _ = fa_ok(torch.zeros_like(g_f[0]), g_r[0], g_p[0])
    RESULTS["checks"][f"{name} self-test: an all-zero grad[{diff[0]}] fails"] = dict(ok=not zero_ok)


@section("ops bf16 vs fp32 reference")
def check_ops():
    B, T, H, D, C, Fh, N, V = (S[k] for k in "B T H D C F N V".split())
    rand = lambda *s, scale=1.0: torch.randn(*s, device=DEV) * scale  # noqa: E731
    p, seed = 0.1, torch.tensor([1234], device=DEV, dtype=torch.int64)
    check_op(
        "attention",
        lambda q: ops.causal_attention(q, H),
        lambda q: reference.causal_attention(q, H),
        lambda: [rand(B, T, 3 * H * D)],
    )
    attn_mask = torch.ops.gpt1.attention_dropout_mask(seed, B, H, T, p)  # the reference is fed the kernel's mask
    check_op(
        "attention p=0.1",
        lambda q: torch.ops.gpt1.attention_fwd(q, H, p, seed)[0],
        lambda q: reference.causal_attention(q, H, p, dropout_mask=attn_mask),
        lambda: [rand(B, T, 3 * H * D)],
    )
    ln_inputs = lambda: [rand(N, C), rand(N, C), 1 + rand(C, scale=0.1), rand(C, scale=0.1)]  # noqa: E731
    check_op("add_layernorm", ops.add_layernorm, reference.add_layernorm, ln_inputs)
    ln_mask = torch.ops.gpt1.add_layernorm_dropout_mask(seed, N, C, p)
    check_op(
        "add_layernorm p=0.1",
        lambda x, r, w, b: torch.ops.gpt1.add_layernorm_fwd(x, r, w, b, 1e-5, p, seed)[0],
        lambda x, r, w, b: reference.add_layernorm(x, r, w, b, 1e-5, p, dropout_mask=ln_mask),
        ln_inputs,
    )
    ffn_inputs = lambda: [rand(N, C), rand(Fh, C, scale=C**-0.5), rand(Fh, scale=0.1)]  # noqa: E731
    check_op("linear_gelu", ops.linear_gelu, reference.linear_gelu, ffn_inputs)
    import gpt1_kernels.linear_gelu as klg

    for impl, fwd in klg.CANDIDATES.items():  # each forward candidate (backward is shared)
        check_op(
            f"linear_gelu fwd candidate {impl}",
            lambda x, w, b, fwd=fwd: fwd(x, w, b, "tanh")[0],
            reference.linear_gelu,
            ffn_inputs,
            grads=False,
        )
    targets = torch.randint(0, V, (N,), device=DEV)
    targets[::7] = -100
    check_op(
        "linear_cross_entropy",
        lambda h, w: ops.linear_cross_entropy(h, w, targets),
        lambda h, w: reference.linear_cross_entropy(h, w, targets),
        lambda: [rand(N, C), rand(V, C, scale=0.02)],
    )

    # The multi-chunk path (training batches are several chunks): chunks of 512 rows vs one chunk.
    import gpt1_kernels.linear_cross_entropy as kce

    h, w = rand(N, C).to(BF16), rand(V, C, scale=0.02).to(BF16)
    one = kce.linear_cross_entropy_fwd(h, w, targets, -100, True)
    many = kce.linear_cross_entropy_fwd(h, w, targets, -100, True, chunk_rows=max(1, N // 4))
    ref = [t.float() for t in one]
    for k, name in enumerate(("loss", "grad_hidden", "grad_weight")):
        e = err(many[k], ref[k])
        tol = 2.0**-7 * max(ref[k].abs().max().item(), 1e-12)  # two bf16 ulps at the tensor's scale
        RESULTS["checks"][f"linear_cross_entropy chunked vs one chunk: {name}"] = dict(err=e, ok=e <= tol)


@section("dropout masks")
def check_dropout():
    """fp32 fused with dropout == the reference fed the kernel's exported mask (fwd + grads)."""
    B, T, H, D, C, N = (S[k] for k in "B T H D C N".split())
    p = 0.1
    seed = torch.tensor([1234], device=DEV, dtype=torch.int64)
    qkv = torch.randn(B, T, 3 * H * D, device=DEV)
    mask = torch.ops.gpt1.attention_dropout_mask(seed, B, H, T, p)
    a, lse = torch.ops.gpt1.attention_fwd(qkv, H, p, seed)
    g = torch.randn_like(a)
    dq = torch.ops.gpt1.attention_bwd(g, qkv, a, lse, H, p, seed)
    q = leaf(qkv)
    r = reference.causal_attention(q, H, p, dropout_mask=mask)
    r.backward(g)
    RESULTS["checks"]["attention dropout fwd (fp32, kernel mask)"] = dict(err=err(a, r), ok=err(a, r) < 1e-4)
    RESULTS["checks"]["attention dropout bwd (fp32, kernel mask)"] = dict(
        err=err(dq, q.grad), ok=err(dq, q.grad) < 1e-4
    )
    keep = mask.tril().sum().item() / (B * H * T * (T + 1) / 2)
    RESULTS["checks"]["attention keep rate"] = dict(value=keep, ok=abs(keep - (1 - p)) < 0.01)
    x, res = torch.randn(N, C, device=DEV), torch.randn(N, C, device=DEV)
    w, b = torch.ones(C, device=DEV), torch.zeros(C, device=DEV)
    m = torch.ops.gpt1.add_layernorm_dropout_mask(seed, N, C, p)
    y, _, _ = torch.ops.gpt1.add_layernorm_fwd(x, res, w, b, 1e-5, p, seed)
    yr = reference.add_layernorm(x, res, w, b, 1e-5, p, dropout_mask=m)
    RESULTS["checks"]["add_layernorm dropout fwd (fp32, kernel mask)"] = dict(err=err(y, yr), ok=err(y, yr) < 1e-4)


@section("GPT-1 step bf16 vs fp32")
def check_model():
    """A full training step's loss and gradients: fused bf16-autocast vs reference fp32,
    against the reference's own bf16-autocast error (relative L2 per parameter, 2x rule)."""
    cfg = GPT1Config.from_name("gpt1-tiny" if ARGS.smoke else "gpt1", attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    B, T = (2, 32) if ARGS.smoke else (4, 512)
    torch.manual_seed(0)
    ref = GPT1(cfg, fused=False).to(DEV)
    fused = GPT1(cfg, fused=True).to(DEV)
    fused.load_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=DEV)

    def run(model, autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEV, dtype=BF16, enabled=autocast):
            loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}

    l32, g32 = run(ref, False)
    lpt, gpt = run(ref, True)
    lf, gf = run(fused, True)
    fa_rule("gpt1 step loss", lf, l32, lpt)
    # FA rule on the whole gradient (all parameters, one vector): relative L2 error. Per
    # parameter it is ill-conditioned where the true gradient is ~0 (c_attn's key bias:
    # softmax ignores a per-query constant), so per-parameter ratios are reported only.
    flat = lambda g: torch.cat([g[n].flatten() for n in g32])  # noqa: E731
    ref = flat(g32)
    e, base = ((flat(gf) - ref).norm() / ref.norm()).item(), ((flat(gpt) - ref).norm() / ref.norm()).item()
    per_param = {n: ((gf[n] - g32[n]).norm() / (gpt[n] - g32[n]).norm().clamp_min(1e-30)).item() for n in g32}
    worst = max(per_param, key=per_param.get)
    RESULTS["checks"]["gpt1 step grads (rel L2, all params)"] = dict(
        err=e, pytorch_bf16_err=base, ok=e <= 2 * base, worst_param=worst, worst_param_ratio=per_param[worst]
    )


# ---- (b) timings -------------------------------------------------------------------------

TB = (
    dict(B=2, T=64, H=2, D=16, N=128, C=48, F=192)
    if ARGS.smoke
    else dict(B=32, T=512, H=12, D=64, N=32 * 512, C=768, F=3072)
)


@section("attention timing")
def time_attention():
    B, T, H, D = (TB[k] for k in "B T H D".split())
    qkv = torch.randn(B, T, 3 * H * D, device=DEV, dtype=BF16, requires_grad=True)
    fwd_flop = 4 * B * T * T * H * D / 2
    g = torch.randn(B, T, H * D, device=DEV, dtype=BF16)

    def sdpa(x, p=0.0):
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p).transpose(1, 2).reshape(B, T, H * D)

    rows = {}
    for name, fn in (
        ("fused", lambda: ops.causal_attention(qkv, H)),
        ("sdpa", lambda: sdpa(qkv)),
        ("fused p=0.1", lambda: ops.causal_attention(qkv, H, 0.1)),
        ("sdpa p=0.1", lambda: sdpa(qkv, 0.1)),
    ):
        with torch.no_grad():
            t_f = bench(fn)
        out = fn()
        t_b = bench(lambda: torch.autograd.grad(out, qkv, g, retain_graph=True))
        t_fb = bench(lambda: torch.autograd.grad(fn(), qkv, g))
        rows[name] = dict(
            fwd_ms=t_f * 1e3,
            bwd_ms=t_b * 1e3,
            fwd_bwd_ms=t_fb * 1e3,
            fwd_tflops=fwd_flop / t_f / 1e12,
            bwd_tflops=2.5 * fwd_flop / t_b / 1e12,
            fwd_bwd_tflops=3.5 * fwd_flop / t_fb / 1e12,
        )
    RESULTS["timings"]["attention (bf16, causal)"] = dict(shape=dict(B=B, T=T, H=H, D=D), **rows)


@section("add+LayerNorm timing")
def time_layernorm():
    N, C = TB["N"], TB["C"]
    # as in training under autocast: the residual stream x (and y, dy, dx) fp32, r a bf16 matmul output
    x = torch.randn(N, C, device=DEV, requires_grad=True)
    r = torch.randn(N, C, device=DEV, dtype=BF16, requires_grad=True)
    w = torch.ones(C, device=DEV, requires_grad=True)
    b = torch.zeros(C, device=DEV, requires_grad=True)
    g = torch.randn(N, C, device=DEV)
    rows = {}
    for p in (0.0, 0.1):
        # compulsory traffic, bytes: fwd reads x (4), r (2), writes y (4); bwd reads dy, x (4 + 4), r (2),
        # writes dx (4) and, with dropout only, dr (2; without it grad_r is grad_x itself)
        nbytes = N * C * (10 + 14 + (2 if p > 0 else 0))

        def fused():
            return torch.autograd.grad(ops.add_layernorm(x, r, w, b, 1e-5, p), (x, r, w, b), g)

        def eager():
            y = F.layer_norm(x + F.dropout(r, p), (C,), w, b, 1e-5)
            return torch.autograd.grad(y, (x, r, w, b), g)

        for name, fn in (("fused", fused), ("eager", eager)):
            t = bench(fn)
            rows[f"{name} p={p}"] = dict(fwd_bwd_ms=t * 1e3, gbps=nbytes / t / 1e9)
    src = torch.empty(nbytes // 2, device=DEV, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    rows["device copy"] = dict(ms=t * 1e3, gbps=2 * src.numel() / t / 1e9)
    RESULTS["timings"]["add+LayerNorm fwd+bwd (x fp32, r bf16)"] = dict(shape=dict(N=N, C=C), **rows)


@section("FFN timing")
def time_ffn():
    import gpt1_kernels.linear_gelu as klg

    N, C, Fh = TB["N"], TB["C"], TB["F"]
    x = torch.randn(N, C, device=DEV, dtype=BF16)
    w = torch.randn(Fh, C, device=DEV, dtype=BF16) * C**-0.5
    b = torch.zeros(Fh, device=DEV, dtype=BF16)
    rows = {"matmul only (x Wᵀ)": dict(ms=bench(lambda: x @ w.t()) * 1e3)}
    for name in klg.CANDIDATES:
        fn = klg.CANDIDATES[name]
        rows[f"fused fwd: {name}"] = dict(ms=bench(lambda: fn(x, w, b, "tanh")) * 1e3)
    rows["eager addmm + gelu"] = dict(ms=bench(lambda: F.gelu(torch.addmm(b, x, w.t()), approximate="tanh")) * 1e3)
    rows["default"] = klg.DEFAULT_IMPL
    RESULTS["timings"]["FFN c_fc + bias + GELU fwd (bf16)"] = dict(shape=dict(N=N, C=C, F=Fh), **rows)


def _mfu(cfg: GPT1Config, T: int, tokens_per_s: float) -> float:
    """engine/training/flops.py's formula, the one engine/training/trainer.py logs, over the device's bf16 peak."""
    peak = peak_bf16_flops(torch.cuda.get_device_name() if DEV == "cuda" else "")
    if peak is None:
        return float("nan")
    return mfu(flops_per_token(cfg.num_parameters(), cfg.n_layer, cfg.n_embd, T), tokens_per_s, peak)


def _step_row(provider: str, cfg: GPT1Config, B: int, T: int) -> dict:
    """Tokens/s, MFU and peak memory of one provider's training step (its own model and optimizer)."""
    torch.manual_seed(0)
    model = GPT1(cfg, fused=provider == "fused").to(DEV).train()
    run = torch.compile(model) if provider == "compile" else model
    opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, weight_decay=0.01, fused=DEV == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=DEV)

    def step():
        with torch.autocast(DEV, dtype=BF16, enabled=DEV == "cuda"):
            loss = run(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: autotuning, compilation, optimizer state
        step()
    peak = float("nan")
    if DEV == "cuda":  # peak of two plain steps, before do_bench allocates its L2-flush buffer
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    t = bench(step, rounds=10)
    tps = B * T / t
    return dict(step_ms=t * 1e3, tokens_per_s=tps, mfu=_mfu(cfg, T, tps), peak_gib=peak)


@section("training step timing")
def time_step():
    cfg = GPT1Config.from_name("gpt1-tiny" if ARGS.smoke else "gpt1")
    B, T = (2, 32) if ARGS.smoke else (32, 512)
    providers = ["fused", "eager"] + ([] if ARGS.skip_compile else ["compile"])
    rows = {}
    for provider in providers:
        rows[provider] = _step_row(provider, cfg, B, T)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    if "fused" in rows and "eager" in rows:
        rows["fused / eager speed"] = rows["fused"]["tokens_per_s"] / rows["eager"]["tokens_per_s"]
        rows["fused / eager peak memory"] = (
            rows["fused"]["peak_gib"] / rows["eager"]["peak_gib"] if DEV == "cuda" else None
        )
    RESULTS["timings"]["training step (gpt1, bf16 autocast, fused AdamW)"] = dict(shape=dict(B=B, T=T), **rows)


@section("CUDA test suite")
def run_tests():
    """python -m pytest CUDA_TESTS on the GPU (CUDA tensors), under TEST_CAP_S. With --smoke only
    collected (the suite runs in CI on CPU): that the command finds its tests is what can break here."""
    import subprocess

    if ARGS.skip_tests:
        RESULTS["tests"] = dict(skipped="--skip-tests")
        return
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPT1_CPU_KERNELS")}
    # no -x: a C++-backend failure (say, no ninja to JIT-build csrc/) must not hide the Triton results
    cmd = [sys.executable, "-m", "pytest", *CUDA_TESTS, "-q", "-rfE", "-p", "no:cacheprovider"]
    cmd += ["--collect-only"] if ARGS.smoke else []
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TEST_CAP_S)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", f"stopped after {TEST_CAP_S} s: " + str(e.stdout or "")[-2000:]
    RESULTS["tests"] = dict(command=" ".join(cmd[1:]), rc=rc, wall_s=time.perf_counter() - t0, tail=tail)
    RESULTS["checks"]["CUDA test suite " + ("collects" if ARGS.smoke else "passes")] = dict(ok=rc == 0, rc=rc)


def _fmt(v) -> str:
    return f"{v:,.3f}" if isinstance(v, float) else str(v)


def print_table() -> None:
    print(f"\n== {RESULTS['device']}  torch {RESULTS['torch']}  triton {RESULTS['triton']}  {RESULTS['date']}")
    print("\n-- correctness (bf16 vs fp32 reference; FA rule: err <= 2 x PyTorch bf16 err)")
    for name, r in RESULTS["checks"].items():
        rest = "  ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k != "ok")
        print(f"  {'ok  ' if r.get('ok') else 'FAIL'} {name:<55} {rest}")
    for group, rows in RESULTS["timings"].items():
        print(f"\n-- {group}  {rows.get('shape', '')}")
        for name, r in rows.items():
            if name == "shape":
                continue
            cells = "  ".join(f"{k}={_fmt(v)}" for k, v in r.items()) if isinstance(r, dict) else _fmt(r)
            print(f"  {name:<28} {cells}")
    for e in RESULTS["errors"]:
        print(f"  ERROR {e}")


def main() -> int:
    import triton

    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (triton interpreter, smoke)"
    RESULTS.update(
        device=name,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        triton=triton.__version__,
        smoke=ARGS.smoke,
    )
    parts = dict(
        zip(
            PARTS,
            (check_ops, check_dropout, check_model, time_attention, time_layernorm, time_ffn, time_step, run_tests),
        )
    )
    for name in PARTS:
        if not ARGS.only or name in ARGS.only:
            parts[name]()
    RESULTS["wall_s"] = time.perf_counter() - t0
    print_table()
    failed = [k for k, v in RESULTS["checks"].items() if not v.get("ok")]
    print(
        f"\nchecks: {len(RESULTS['checks']) - len(failed)} ok, {len(failed)} failed {failed}; "
        f"errors: {len(RESULTS['errors'])}"
    )
    out = ARGS.out or ROOT / "bench" / "results" / f"{name.replace(' ', '_')}-{_dt.date.today()}.json"
    if not ARGS.smoke or ARGS.out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")
        print(f"wrote {out}")
    return 1 if failed or RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
