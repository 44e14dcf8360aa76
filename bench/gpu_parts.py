"""The parts of bench/gpu_check.py, each run in its own process: what the first GPU call checks and times.

    python3 -m bench.gpu_parts PART --out DIR [--smoke]      (bench/gpu_check.py starts these)

Correctness, bf16 against the fp32 reference by the FlashAttention rule (tests/helpers.py: the
fused op's error ≤ 2× PyTorch's own bf16 error, plus one ulp at the tensor's scale): each op's
output and every gradient, each op's first gradient also fed to the rule as zeros, which must
fail. Dropout: the GPU's masks bit for bit against the NumPy spec (tests/philox_ref.py), so a
Philox miscompile shared by mask and kernel cannot pass, and fused dropout against the reference
fed that mask. Timings: attention in TFLOP/s (FlashAttention's formula: fwd 4·B·T²·H·D, halved
when causal; bwd 2.5× fwd) beside SDPA; add+LayerNorm in GB/s beside eager and a device copy;
the FFN's first projection beside the matmul alone; the training step (B×T = 32×512, bf16
autocast, fused AdamW) in tokens/s, MFU (engine/training/flops.py's, as the trainer logs it) and
peak memory (taken before do_bench allocates its L2-flush buffer). The test suite:
bench/gpu_tests.py. Any exception is recorded and the part goes on, except a CUDA error, which
poisons the process: the part stops there and the next part starts a fresh one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.py (the tolerances) and philox_ref.py (the dropout spec)
from engine._kernels import kernels_package  # noqa: E402

kernels_package()  # gpt1_kernels: this checkout's kernels/

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.gpu_check import BUDGETS, CUDA_FAULT_EXIT, FAULTS, NO_GPU_EXIT, Recorder  # noqa: E402
from engine import GPT1, GPT1Config, ops  # noqa: E402
from engine.model import reference  # noqa: E402
from engine.training.flops import flops_per_token, mfu, peak_bf16_flops  # noqa: E402
from helpers import FA_FLOOR, FA_SLACK  # noqa: E402

BF16 = torch.bfloat16
# correctness shapes (attention at the timing shape: the autotuner's picks made here are the ones timed)
CHECK = dict(B=32, T=512, H=12, D=64, C=768, F=3072, N=2048, V=40478)
CHECK_SMOKE = dict(B=1, T=21, H=2, D=16, C=48, F=192, N=9, V=211)
TIME = dict(B=32, T=512, H=12, D=64, N=32 * 512, C=768, F=3072)
TIME_SMOKE = dict(B=1, T=32, H=2, D=16, N=8, C=48, F=192)


class Part:
    """One part's run: its recorder, device, shapes, and the sections it runs."""

    def __init__(self, rec: Recorder, smoke: bool, budget: float):
        self.rec, self.smoke, self.budget = rec, smoke, budget
        self.dev = "cpu" if smoke else "cuda"
        self.check_shape, self.time_shape = (CHECK_SMOKE, TIME_SMOKE) if smoke else (CHECK, TIME)
        if smoke:  # the Triton launchers as the CPU kernels (GPT1_CPU_KERNELS=triton), for torch.ops.gpt1 too
            ops.load_cpu_kernels()

    def model(self) -> tuple[GPT1Config, int, int]:
        """GPT-1 (117M) and the batch it is checked and timed at; a tiny one under the interpreter."""
        if self.smoke:
            return GPT1Config.from_name("gpt1-tiny", vocab_size=101), 1, 8
        return GPT1Config.from_name("gpt1"), 32, 512

    def section(self, name: str, fn: Callable[[], None]) -> None:
        """fn(); an exception is recorded and the part goes on, unless CUDA is poisoned."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 — recorded, and the next section runs
            traceback.print_exc()
            self.rec.error(name, f"{type(e).__name__}: {e}"[:2000])
            if type(e).__name__ == "AcceleratorError" or "CUDA error" in str(e):
                self.rec.error("part", "a CUDA error poisons the process: this part stops here")
                sys.exit(CUDA_FAULT_EXIT)

    def bench(self, fn: Callable[[], object]) -> float:
        """Median seconds of fn(); CUDA: triton.testing.do_bench (L2 flushed, synchronised)."""
        if self.dev == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        t0 = time.perf_counter()  # --smoke: one call, to run the code (the interpreter's time means nothing)
        fn()
        return time.perf_counter() - t0

    def rand(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device=self.dev) * scale

    def seed(self, value: int = 1234) -> torch.Tensor:
        return torch.tensor([value], device=self.dev, dtype=torch.int64)


# ---- correctness helpers ------------------------------------------------------------------


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def fa_ok(fused: torch.Tensor, ref32: torch.Tensor, pt_lowp: torch.Tensor) -> tuple[bool, dict]:
    """err(fused) ≤ FA_SLACK·err(PyTorch low precision) + one ulp at the tensor's own scale
    (relative: a gradient of 1e-4 gets a floor of ~4e-7, and an all-zero one fails)."""
    e, base = err(fused, ref32), err(pt_lowp, ref32)
    tol = FA_SLACK * base + FA_FLOOR.get(fused.dtype, FA_FLOOR[BF16]) * ref32.double().abs().max().item()
    ok = bool(torch.isfinite(fused.float()).all()) and e <= tol
    return ok, dict(err=e, pytorch_lowp_err=base, tol=tol)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def grads_of(fn, inputs, upstream):
    out = fn()
    out.backward(upstream)
    return out.detach(), [t.grad.detach().clone() for t in inputs]


def check_op(part: Part, name: str, fused_fn, ref_fn, make_inputs, grads: bool = True) -> None:
    """fused in bf16 vs the reference in fp32 and in bf16: out and every gradient (out only if not
    grads); the first gradient also as all zeros, which the rule must reject."""
    torch.manual_seed(0)
    base = make_inputs()
    lowp, full, lowp2 = (
        [leaf(t.to(d)) if t.is_floating_point() else t for t in base] for d in (BF16, torch.float32, BF16)
    )
    diff = [i for i, t in enumerate(base) if t.is_floating_point()]
    if not grads:
        with torch.no_grad():
            fa_rule(part, f"{name} out", fused_fn(*lowp), ref_fn(*full), ref_fn(*lowp2))
        return
    upstream = torch.randn_like(ref_fn(*full).float().detach())
    up_lowp = upstream.to(BF16) if upstream.ndim else upstream
    out_f, g_f = grads_of(lambda: fused_fn(*lowp), [lowp[i] for i in diff], up_lowp)
    out_r, g_r = grads_of(lambda: ref_fn(*full), [full[i] for i in diff], upstream)
    out_p, g_p = grads_of(lambda: ref_fn(*lowp2), [lowp2[i] for i in diff], up_lowp)
    fa_rule(part, f"{name} out", out_f, out_r, out_p)
    for k, (a, b, c) in enumerate(zip(g_f, g_r, g_p)):
        fa_rule(part, f"{name} grad[{diff[k]}]", a, b, c)
    zero_ok, _ = fa_ok(torch.zeros_like(g_f[0]), g_r[0], g_p[0])
    part.rec.check(f"{name} self-test: an all-zero grad[{diff[0]}] fails", not zero_ok)


def fa_rule(part: Part, name: str, fused: torch.Tensor, ref32: torch.Tensor, lowp: torch.Tensor) -> None:
    ok, row = fa_ok(fused, ref32, lowp)
    part.rec.check(name, ok, **row)


# ---- ops: preflight, then every op at GPT-1's shapes ---------------------------------------


def preflight(part: Part) -> None:
    """The CUDA-only PyTorch calls the kernels rely on, and which fallback this torch takes."""
    from gpt1_kernels.linear_cross_entropy import fp32_output

    for dtype in (BF16, torch.float16):
        can, name = fp32_output(part.dev, dtype), str(dtype).removeprefix("torch.")
        path = (
            "in place: torch.addmm(acc, g, h, out_dtype=float32, out=acc)"
            if can.addmm
            else "an unrounded float32 temporary: torch.mm(g, h, out_dtype=float32)"
            if can.mm
            else "the product rounded once per chunk (this torch has no out_dtype here)"
        )
        part.rec.info(f"LM head grad_weight accumulation, {name}", path)
        part.rec.info(f"LM head grad_hidden GEMM, {name}", "float32 output" if can.mm else f"rounded to {name}")
    part.rec.info("float32 matmul precision (torch)", torch.get_float32_matmul_precision())
    if part.dev == "cuda":
        p = torch.zeros(4, device="cuda", requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], fused=True).step()
        part.rec.info("fused AdamW", "runs")
    part.rec.info("C++ CPU kernels", "not built: the GPU runs the Triton kernels (CI tests csrc/)")


def part_ops(part: Part) -> None:
    part.section("preflight", lambda: preflight(part))
    B, T, H, D, C, Fh, N, V = (part.check_shape[k] for k in "B T H D C F N V".split())
    p, seed, rand = 0.1, part.seed(), part.rand

    def attention():
        check_op(
            part,
            "attention",
            lambda q: ops.causal_attention(q, H),
            lambda q: reference.causal_attention(q, H),
            lambda: [rand(B, T, 3 * H * D)],
        )

    def attention_dropout():
        mask = torch.ops.gpt1.attention_dropout_mask(seed, B, H, T, p)  # the reference is fed the kernel's mask
        check_op(
            part,
            "attention p=0.1",
            lambda q: torch.ops.gpt1.attention_fwd(q, H, p, seed)[0],
            lambda q: reference.causal_attention(q, H, p, dropout_mask=mask),
            lambda: [rand(B, T, 3 * H * D)],
        )

    def ln_inputs():
        return [rand(N, C), rand(N, C), 1 + rand(C, scale=0.1), rand(C, scale=0.1)]

    def add_layernorm():
        check_op(part, "add_layernorm", ops.add_layernorm, reference.add_layernorm, ln_inputs)
        mask = torch.ops.gpt1.add_layernorm_dropout_mask(seed, N, C, p)
        check_op(
            part,
            "add_layernorm p=0.1",
            lambda x, r, w, b: torch.ops.gpt1.add_layernorm_fwd(x, r, w, b, 1e-5, p, seed)[0],
            lambda x, r, w, b: reference.add_layernorm(x, r, w, b, 1e-5, p, dropout_mask=mask),
            ln_inputs,
        )

    def linear_gelu():
        import gpt1_kernels.linear_gelu as klg

        def inputs():
            return [rand(N, C), rand(Fh, C, scale=C**-0.5), rand(Fh, scale=0.1)]

        check_op(part, "linear_gelu", ops.linear_gelu, reference.linear_gelu, inputs)
        for impl, fwd in klg.CANDIDATES.items():  # each forward candidate (backward is shared)
            check_op(
                part,
                f"linear_gelu fwd candidate {impl}",
                lambda x, w, b, fwd=fwd: fwd(x, w, b, "tanh")[0],
                reference.linear_gelu,
                inputs,
                grads=False,
            )

    def linear_cross_entropy():
        import gpt1_kernels.linear_cross_entropy as kce

        targets = torch.randint(0, V, (N,), device=part.dev)
        targets[::7] = -100
        check_op(
            part,
            "linear_cross_entropy",
            lambda h, w: ops.linear_cross_entropy(h, w, targets),
            lambda h, w: reference.linear_cross_entropy(h, w, targets),
            lambda: [rand(N, C), rand(V, C, scale=0.02)],
        )
        # several chunks (training batches are) against one: the float32 accumulation across chunks
        h, w = rand(N, C).to(BF16), rand(V, C, scale=0.02).to(BF16)
        one = kce.linear_cross_entropy_fwd(h, w, targets, -100, True)
        many = kce.linear_cross_entropy_fwd(h, w, targets, -100, True, chunk_rows=max(1, N // 4))
        for k, name in enumerate(("loss", "grad_hidden", "grad_weight")):
            e, ref = err(many[k], one[k]), one[k].float()
            tol = 2.0**-7 * max(ref.abs().max().item(), 1e-12)  # two bf16 ulps at the tensor's scale
            part.rec.check(f"linear_cross_entropy 4 chunks vs 1: {name}", e <= tol, err=e, tol=tol)

    for name, fn in [
        ("attention", attention),
        ("attention p=0.1", attention_dropout),
        ("add_layernorm", add_layernorm),
        ("linear_gelu", linear_gelu),
        ("linear_cross_entropy", linear_cross_entropy),
    ]:
        part.section(name, fn)


# ---- dropout: the GPU's masks are the spec's, and the kernels apply them ---------------------


def part_dropout(part: Part) -> None:
    from philox_ref import attention_keep_mask, keep_mask

    B, T, H, D, C, N = (part.check_shape[k] for k in "B T H D C N".split())
    p, seed_value = 0.1, 2**40 + 1234  # the seed's high word keys Philox too
    seed = part.seed(seed_value)

    def masks_are_the_spec():
        b, h, t = 2, 3, min(T, 67)
        keep = torch.ops.gpt1.attention_dropout_mask(seed, b, h, t, p).cpu().numpy()
        bh, i, j = np.meshgrid(np.arange(b * h), np.arange(t), np.arange(t), indexing="ij")
        tril = np.tril(np.ones((t, t), dtype=bool))
        want = attention_keep_mask(seed_value, p, i, j, bh).reshape(b, h, t, t)
        wrong = int((keep[..., tril] != want[..., tril]).sum())
        part.rec.check(
            "attention mask == NumPy spec (bit for bit)", wrong == 0, wrong=wrong, of=int(b * h * tril.sum())
        )
        rows = min(N, 67)
        keep = torch.ops.gpt1.add_layernorm_dropout_mask(seed, rows, C, p).cpu().numpy()
        i, j = np.meshgrid(np.arange(rows), np.arange(C), indexing="ij")
        wrong = int((keep != keep_mask(seed_value, p, i, j, stream=np.zeros_like(i))).sum())
        part.rec.check("add_layernorm mask == NumPy spec (bit for bit)", wrong == 0, wrong=wrong, of=rows * C)

    def attention_applies_its_mask():
        qkv = torch.randn(B, T, 3 * H * D, device=part.dev)
        mask = torch.ops.gpt1.attention_dropout_mask(seed, B, H, T, p)
        a, lse = torch.ops.gpt1.attention_fwd(qkv, H, p, seed)
        g = torch.randn_like(a)
        dq = torch.ops.gpt1.attention_bwd(g, qkv, a, lse, H, p, seed)
        q = leaf(qkv)
        r = reference.causal_attention(q, H, p, dropout_mask=mask)
        r.backward(g)
        part.rec.check("attention dropout fwd (fp32, kernel mask)", err(a, r) < 1e-4, err=err(a, r))
        part.rec.check("attention dropout bwd (fp32, kernel mask)", err(dq, q.grad) < 1e-4, err=err(dq, q.grad))
        keep = mask.tril().sum().item() / (B * H * T * (T + 1) / 2)
        q8 = min(round(p * 256), 255) / 256  # the 8-bit threshold's drop rate
        part.rec.check("attention keep rate", abs(keep - (1 - q8)) < 0.01, value=keep, expected=1 - q8)

    def add_layernorm_applies_its_mask():
        x, res = torch.randn(N, C, device=part.dev), torch.randn(N, C, device=part.dev)
        w, b = torch.ones(C, device=part.dev), torch.zeros(C, device=part.dev)
        m = torch.ops.gpt1.add_layernorm_dropout_mask(seed, N, C, p)
        y, _, _ = torch.ops.gpt1.add_layernorm_fwd(x, res, w, b, 1e-5, p, seed)
        yr = reference.add_layernorm(x, res, w, b, 1e-5, p, dropout_mask=m)
        part.rec.check("add_layernorm dropout fwd (fp32, kernel mask)", err(y, yr) < 1e-4, err=err(y, yr))

    part.section("masks vs NumPy", masks_are_the_spec)
    part.section("attention dropout", attention_applies_its_mask)
    part.section("add_layernorm dropout", add_layernorm_applies_its_mask)


# ---- model: a whole GPT-1 training step -----------------------------------------------------


def part_model(part: Part) -> None:
    """Loss and gradients of one step: fused bf16 autocast vs reference fp32, against the
    reference's own bf16 error (relative L2 over all parameters, the 2× rule)."""

    def step_check():
        cfg, _, T = part.model()
        cfg = dataclasses.replace(cfg, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        B = 1 if part.smoke else 4
        torch.manual_seed(0)
        ref = GPT1(cfg, fused=False).to(part.dev)
        fused = GPT1(cfg, fused=True).to(part.dev)
        fused.load_state_dict(ref.state_dict())
        ids = torch.randint(0, cfg.vocab_size, (B, T), device=part.dev)

        def run(model, autocast):
            model.zero_grad(set_to_none=True)
            with torch.autocast(part.dev, dtype=BF16, enabled=autocast):
                loss = model(ids, labels=ids).loss
            loss.backward()
            return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}

        l32, g32 = run(ref, False)
        lpt, gpt = run(ref, True)
        lf, gf = run(fused, True)
        fa_rule(part, "gpt1 step loss", lf, l32, lpt)
        # the rule on the whole gradient: per parameter it is ill-conditioned where the true gradient
        # is ~0 (c_attn's key bias: softmax ignores a per-query constant), so those are reported only
        flat = lambda g: torch.cat([g[n].flatten() for n in g32])  # noqa: E731
        ref_flat = flat(g32)
        e = ((flat(gf) - ref_flat).norm() / ref_flat.norm()).item()
        base = ((flat(gpt) - ref_flat).norm() / ref_flat.norm()).item()
        ratio = {n: ((gf[n] - g32[n]).norm() / (gpt[n] - g32[n]).norm().clamp_min(1e-30)).item() for n in g32}
        worst = max(ratio, key=ratio.get)
        part.rec.check(
            "gpt1 step grads (rel L2, all params)",
            e <= 2 * base,
            err=e,
            pytorch_bf16_err=base,
            worst_param=worst,
            worst_param_ratio=ratio[worst],
        )

    part.section("gpt1 step", step_check)


# ---- timings ----------------------------------------------------------------------------------


def part_attention(part: Part) -> None:
    B, T, H, D = (part.time_shape[k] for k in "B T H D".split())
    qkv = torch.randn(B, T, 3 * H * D, device=part.dev, dtype=BF16, requires_grad=True)
    g = torch.randn(B, T, H * D, device=part.dev, dtype=BF16)
    fwd_flop = 4 * B * T * T * H * D / 2

    def sdpa(x, p):
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p).transpose(1, 2).reshape(B, T, H * D)

    def row(name, fn):
        with torch.no_grad():
            t_f = part.bench(fn)
        out = fn()
        t_b = part.bench(lambda: torch.autograd.grad(out, qkv, g, retain_graph=True))
        t_fb = part.bench(lambda: torch.autograd.grad(fn(), qkv, g))
        part.rec.timing(
            "attention",
            name,
            shape=f"B={B} T={T} H={H} D={D} bf16 causal",
            fwd_ms=t_f * 1e3,
            bwd_ms=t_b * 1e3,
            fwd_bwd_ms=t_fb * 1e3,
            fwd_tflops=fwd_flop / t_f / 1e12,
            bwd_tflops=2.5 * fwd_flop / t_b / 1e12,
            fwd_bwd_tflops=3.5 * fwd_flop / t_fb / 1e12,
        )

    for p in (0.0, 0.1):
        label = f"p={p:g}"
        part.section(
            f"fused {label}", lambda p=p, label=label: row(f"fused {label}", lambda: ops.causal_attention(qkv, H, p))
        )
        part.section(f"sdpa {label}", lambda p=p, label=label: row(f"sdpa {label}", lambda: sdpa(qkv, p)))


def part_layernorm(part: Part) -> None:
    N, C = part.time_shape["N"], part.time_shape["C"]
    # as in training under autocast: the residual stream x (and y, dy, dx) fp32, r a bf16 matmul output
    x = torch.randn(N, C, device=part.dev, requires_grad=True)
    r = torch.randn(N, C, device=part.dev, dtype=BF16, requires_grad=True)
    w = torch.ones(C, device=part.dev, requires_grad=True)
    b = torch.zeros(C, device=part.dev, requires_grad=True)
    g = torch.randn(N, C, device=part.dev)

    def rows(p):
        # compulsory bytes: fwd reads x (4), r (2), writes y (4); bwd reads dy, x (4 + 4), r (2), writes
        # dx (4) and, with dropout only, dr (2; without it grad_r is grad_x itself)
        nbytes = N * C * (10 + 14 + (2 if p > 0 else 0))
        fused = lambda: torch.autograd.grad(ops.add_layernorm(x, r, w, b, 1e-5, p), (x, r, w, b), g)  # noqa: E731
        eager = lambda: torch.autograd.grad(F.layer_norm(x + F.dropout(r, p), (C,), w, b, 1e-5), (x, r, w, b), g)  # noqa: E731
        for name, fn in (("fused", fused), ("eager", eager)):
            t = part.bench(fn)
            part.rec.timing(
                "add+LayerNorm fwd+bwd", f"{name} p={p:g}", shape=f"N={N} C={C}", ms=t * 1e3, gbps=nbytes / t / 1e9
            )

    def copy():  # reads and writes the bytes fused fwd+bwd with dropout moves: 26 per element
        src = torch.empty(N * C * 13, device=part.dev, dtype=torch.uint8)
        dst = torch.empty_like(src)
        t = part.bench(lambda: dst.copy_(src))
        part.rec.timing("add+LayerNorm fwd+bwd", "device copy", ms=t * 1e3, gbps=2 * src.numel() / t / 1e9)

    part.section("p=0", lambda: rows(0.0))
    part.section("p=0.1", lambda: rows(0.1))
    part.section("device copy", copy)


def part_ffn(part: Part) -> None:
    import gpt1_kernels.linear_gelu as klg

    N, C, Fh = (part.time_shape[k] for k in "N C F".split())
    x = torch.randn(N, C, device=part.dev, dtype=BF16)
    w = torch.randn(Fh, C, device=part.dev, dtype=BF16) * C**-0.5
    b = torch.zeros(Fh, device=part.dev, dtype=BF16)
    shape = f"N={N} C={C} F={Fh} bf16"

    def one(name, fn):
        part.rec.timing("FFN c_fc + bias + GELU fwd", name, shape=shape, ms=part.bench(fn) * 1e3)

    part.section("matmul", lambda: one("matmul only (x Wᵀ)", lambda: x @ w.t()))
    for impl, fn in klg.CANDIDATES.items():
        part.section(impl, lambda impl=impl, fn=fn: one(f"fused fwd: {impl}", lambda: fn(x, w, b, "tanh")))
    part.section(
        "eager", lambda: one("eager addmm + gelu", lambda: F.gelu(torch.addmm(b, x, w.t()), approximate="tanh"))
    )
    part.rec.info("linear_gelu DEFAULT_IMPL", klg.DEFAULT_IMPL)


def _step_row(part: Part, provider: str, cfg: GPT1Config, B: int, T: int) -> None:
    """Tokens/s, MFU and peak memory of one provider's training step (its own model and optimizer)."""
    torch.manual_seed(0)
    model = GPT1(cfg, fused=provider == "fused").to(part.dev).train()
    run = torch.compile(model) if provider == "compile" else model
    opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, weight_decay=0.01, fused=part.dev == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=part.dev)

    def step():
        with torch.autocast(part.dev, dtype=BF16, enabled=part.dev == "cuda"):
            loss = run(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(0 if part.smoke else 3):  # warm-up: autotuning, compilation, optimizer state
        step()
    peak = float("nan")
    if part.dev == "cuda":  # two plain steps, before do_bench allocates its L2-flush buffer
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    t = part.bench(step)
    tokens_per_s = B * T / t
    device_peak = peak_bf16_flops(torch.cuda.get_device_name()) if part.dev == "cuda" else None
    per_token = flops_per_token(cfg.num_parameters(), cfg.n_layer, cfg.n_embd, T)
    part.rec.timing(
        "step",
        provider,
        shape=f"{cfg.num_parameters() / 1e6:.0f}M B={B} T={T}",
        step_ms=t * 1e3,
        tokens_per_s=tokens_per_s,
        peak_gib=peak,
        mfu=mfu(per_token, tokens_per_s, device_peak) if device_peak else float("nan"),
    )


def part_step(part: Part) -> None:
    """fused and eager first, torch.compile (the slowest to start) last: a kill keeps the others."""
    cfg, B, T = part.model()
    for provider in ("fused", "eager") + (() if part.smoke else ("compile",)):
        part.section(provider, lambda provider=provider: _step_row(part, provider, cfg, B, T))
        if part.dev == "cuda":
            torch.cuda.empty_cache()  # the last provider's model and optimizer state are gone


PARTS = {
    "ops": part_ops,
    "dropout": part_dropout,
    "model": part_model,
    "attention": part_attention,
    "layernorm": part_layernorm,
    "ffn": part_ffn,
    "step": part_step,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=list(BUDGETS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--budget", type=float, default=0.0, help="the seconds the orchestrator gives this part")
    p.add_argument("--fault", choices=FAULTS)
    args = p.parse_args()
    import triton

    if not args.smoke and not torch.cuda.is_available():
        return NO_GPU_EXIT
    rec = Recorder(args.out, args.part, args.fault)
    device = torch.cuda.get_device_name() if not args.smoke else "cpu (Triton interpreter, smoke)"
    rec.header(
        device=device,
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        smoke=args.smoke,
        budget_s=args.budget,
        pid=os.getpid(),
    )
    t0 = time.perf_counter()
    part = Part(rec, args.smoke, args.budget)
    if args.part == "tests":
        from bench.gpu_tests import part_tests

        part_tests(part)
    else:
        PARTS[args.part](part)
    rec.end(wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
