"""Offline sm_90 report: every Triton kernel × every config it may launch, compiled for the H200.

    python bench/sm90_report.py                 # writes bench/results/sm90-report.md
    python bench/sm90_report.py --out FILE.md

No GPU needed: Triton 3.6 compiles for GPUTarget("cuda", 90, 32) (ptxas targets sm_90a) with
its bundled ptxas, and its bundled cuobjdump disassembles the cubin. Every kernel of kernels/ ×
every config of its autotune list (after the autotuner's own early pruning, as it would prune
at these shapes) × {bf16, fp32} × {dropout, none} is compiled at GPT-1's training shapes
(B=64, T=512, H=12, D=64, C=768, V=40478, N = B·T rows), with arguments specialised as a
launch specialises them (16-divisible integers and pointers marked divisible by 16).

Configs are read from the kernel modules, never copied here, so a changed autotune list is what
gets compiled; a kernel argument this file does not know raises an error naming it. Results
are cached by content ($GPT1_CACHE_DIR/sm90 or .cache/sm90; Triton's version, the kernel
sources, this file and the job are the key), so a rerun compiles only what changed.

Columns, per compile:
  smem      shared memory of the launch (bytes, metadata.shared; the limit is 227 KiB)
  regs      registers per thread (ptxas -v), threads = 32 · num_warps
  spill     spill stores + spill loads (bytes per thread, ptxas -v)
  wgmma     wgmma.mma_async instructions in the PTX (static count)
  cvt       ttg.convert_layout ops in the TTGIR (layout changes, often through shared memory)
  loop      SASS instructions (cuobjdump -sass) of each innermost loop, in program order: from
            the target address of a backward BRA to that BRA, with no other such loop inside
            (the loop's back edge; sm_90 instructions are 16 bytes); bar = BAR.SYNC/RED/ARV in
            each of those loops. Attention's kernels have two: off-diagonal and diagonal blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "sm90-report.md"
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one CTA may use on sm_90
MAX_WORKERS = 2  # compiles are CPU heavy: never more than two at once

# GPT-1 at its training shape
B, T, H, D, V = 64, 512, 12, 64, 40478
C = H * D
N = B * T
DTYPES = ("bf16", "fp32")
DROP_THRESH = 6554  # round(0.1 · 2¹⁶); only its specialisation (not 16-divisible) matters
RESULT_VERSION = 1  # part of the cache key: bump when compile_job measures differently


@dataclass(frozen=True)
class Job:
    """One compile: kernel `attr` of module `module`, its non-constexpr arguments (pointer
    types as "*bf16" strings, ints, floats), constexprs and launch options."""

    op: str
    module: str
    attr: str
    dtype: str
    dropout: bool
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int = 3
    config: str = ""
    maxnreg: int | None = None  # a config's register cap (triton.Config.maxnreg)

    @property
    def label(self) -> str:
        return f"{self.op}/{self.attr} {self.config} {self.dtype}{' dropout' if self.dropout else ''}"


@dataclass
class Result:
    job: Job
    error: str = ""
    smem: int = 0
    regs: int = 0
    spill: int = 0
    wgmma: int = 0
    cvt: int = 0
    is_matmul: bool = False
    imuls: int = 0
    loops: list = field(default_factory=list)
    bars: list = field(default_factory=list)

    def failures(self) -> list[str]:
        """What breaks the gate: a compile error, spills, > 227 KiB, a bf16 matmul without wgmma."""
        out = [f"compile error: {self.error.splitlines()[-1] if self.error else ''}"] if self.error else []
        if not self.error:
            if self.spill:
                out.append(f"spills {self.spill} B")
            if self.smem > SMEM_LIMIT:
                out.append(f"shared memory {self.smem} B > {SMEM_LIMIT}")
            if self.is_matmul and self.job.dtype == "bf16" and not self.wgmma:
                out.append("bf16 matmul without wgmma")
        return out


# ---- the jobs: kernels × configs × dtypes × dropout ---------------------------------------


def _ptr(dtype: str) -> str:
    return "*" + dtype


def _tuner_configs(tuner, named_args: dict, meta: dict | None = None) -> list:
    """The configs the autotuner would benchmark at these arguments (its early pruning applied;
    like the autotuner, the hook gets the call's constexprs as keyword arguments too)."""
    prune = getattr(tuner, "early_config_prune", None)
    meta = meta or {}
    return prune(tuner.configs, {**named_args, **meta}, **meta) if prune else tuner.configs


def _named_args(args: dict) -> dict:
    """Arguments as the autotuner's prune hook sees them: tensors (with .dtype) for pointers."""
    import torch
    from triton.runtime.jit import MockTensor

    names = {"bf16": torch.bfloat16, "fp32": torch.float32, "i64": torch.int64, "u8": torch.uint8, "i8": torch.int8}
    return {k: MockTensor(names[v[1:]]) if isinstance(v, str) else v for k, v in args.items()}


def _config_label(cfg_kwargs: dict, num_warps: int, num_stages: int) -> str:
    """Autotune tiles as BLOCK_M×BLOCK_N(×BLOCK_K); a launcher's fixed tile as its constexprs."""
    if "BLOCK_M" in cfg_kwargs:
        blocks = "×".join(str(v) for k, v in cfg_kwargs.items() if k.startswith("BLOCK"))
    else:
        blocks = " ".join(f"{k}={v}" for k, v in cfg_kwargs.items())
    return f"{blocks} w{num_warps} s{num_stages}"


def _check_covered(module, plain: dict, tuners: dict) -> None:
    """Every @triton.jit *_kernel of the module is autotuned or listed in `plain`: a new kernel
    cannot slip past the report."""
    from triton.runtime.jit import JITFunction

    kernels = {n for n, v in vars(module).items() if isinstance(v, JITFunction) and n.endswith("_kernel")}
    missing = kernels - set(plain) - {t.fn.__name__ for t in tuners.values()}
    if missing:
        raise ValueError(
            f"sm90_report: {module.__name__} has kernels {sorted(missing)} that the report does not "
            "compile: add their launch tiles to its jobs function in bench/sm90_report.py"
        )


def attention_jobs() -> list[Job]:
    from triton.runtime.autotuner import Autotuner

    from gpt1_kernels import attention as A

    plain = {  # kernels launched without the autotuner: their launchers' fixed tiles
        "_attn_bwd_delta_kernel": {"BLOCK_M": A._DELTA_BLOCK},
        "_attn_dropout_mask_kernel": dict(zip(("BLOCK_M", "BLOCK_N"), A._MASK_BLOCKS)),
    }
    tuners = {name: t for name, t in vars(A).items() if isinstance(t, Autotuner)}
    _check_covered(A, plain, tuners)
    jobs = []
    for dtype in DTYPES:
        for dropout in (False, True):
            args = dict(
                qkv_ptr=_ptr(dtype),
                out_ptr=_ptr(dtype),
                dout_ptr=_ptr(dtype),
                dqkv_ptr=_ptr(dtype),
                lse_ptr="*fp32",
                delta_ptr="*fp32",
                seed_ptr="*i64",
                keep_ptr="*u8",
                stride_qkv_b=T * 3 * C,
                stride_qkv_t=3 * C,
                stride_out_b=T * C,
                stride_out_t=C,
                stride_dout_b=T * C,
                stride_dout_t=C,
                T=T,
                H=H,
                C=C,
                T_BUCKET=T,
                BH=B * H,
                BH_BUCKET=1 << (B * H - 1).bit_length(),
                sm_scale=D**-0.5,
                qk_scale=D**-0.5,
                drop_thresh=DROP_THRESH,
                drop_scale=1 / 0.9,
            )
            meta = dict(HEAD_DIM=D, HAS_DROPOUT=dropout, DOT_MODE=A._dot_mode(_torch_dtype(dtype)))
            for name, tuner in tuners.items():
                for cfg in _tuner_configs(tuner, _named_args(args), meta):
                    label = _config_label(cfg.kwargs, cfg.num_warps, cfg.num_stages) + (
                        f" r{cfg.maxnreg}" if cfg.maxnreg else ""
                    )
                    jobs.append(
                        Job(
                            "attention",
                            "gpt1_kernels.attention",
                            name,
                            dtype,
                            dropout,
                            args,
                            {**meta, **cfg.kwargs},
                            cfg.num_warps,
                            cfg.num_stages,
                            label,
                            cfg.maxnreg,
                        )
                    )
            for name, blocks in plain.items():
                if name == "_attn_dropout_mask_kernel" and (not dropout or dtype != "bf16"):
                    continue  # draws only: one compile covers it
                if dropout and "HAS_DROPOUT" not in getattr(A, name).arg_names:
                    continue  # the same compile as without dropout
                jobs.append(
                    Job(
                        "attention",
                        "gpt1_kernels.attention",
                        name,
                        dtype,
                        dropout,
                        args,
                        {**meta, **blocks},
                        4,
                        3,
                        _config_label(blocks, 4, 3),
                    )
                )
    return jobs


def add_layernorm_jobs() -> list[Job]:
    from gpt1_kernels import add_layernorm as K

    names = ("_add_layernorm_fwd_kernel", "_add_layernorm_bwd_kernel", "_add_layernorm_dropout_mask_kernel")
    _check_covered(K, dict.fromkeys(names), {})
    jobs = []
    for dtype in DTYPES:
        for dropout in (False, True):
            # training (autocast): the residual stream x (and y, dx) stays fp32, r is a bf16 matmul output
            args = dict(
                x_ptr="*fp32",
                r_ptr=_ptr(dtype),
                w_ptr="*fp32",
                b_ptr="*fp32",
                seed_ptr="*i64",
                y_ptr="*fp32",
                mean_ptr="*fp32",
                rstd_ptr="*fp32",
                dy_ptr="*fp32",
                dx_ptr="*fp32",
                dr_ptr=_ptr(dtype),
                dw_part_ptr="*fp32",
                db_part_ptr="*fp32",
                keep_ptr="*i8",
                N=N,
                C=C,
                n_rows=N,
                n_cols=C,
                eps=1e-5,
                drop_thresh=DROP_THRESH,
                dropout_scale=1 / 0.9,
            )
            fwd, bwd = K.fwd_launch(C), K.bwd_launch(N, C)
            args["blocks_per_group"] = bwd["blocks_per_group"]
            for name, launch in zip(names, (fwd, bwd, fwd)):
                if name.endswith("mask_kernel") and (not dropout or dtype != "bf16"):
                    continue
                blocks = {k: v for k, v in launch.items() if k.isupper()}
                jobs.append(
                    Job(
                        "add_layernorm",
                        "gpt1_kernels.add_layernorm",
                        name,
                        dtype,
                        dropout,
                        args,
                        {"HAS_DROPOUT": dropout, **blocks},
                        launch["num_warps"],
                        3,
                        _config_label(blocks, launch["num_warps"], 3),
                    )
                )
    return jobs


def linear_gelu_jobs() -> list[Job]:
    from gpt1_kernels import linear_gelu as G

    F = 4 * C
    _check_covered(G, dict.fromkeys(("_gelu_fwd_kernel", "_gelu_bwd_kernel")), {"": G._matmul_autotuned})
    jobs = []
    for dtype in DTYPES:
        args = dict(
            x_ptr=_ptr(dtype),
            w_ptr=_ptr(dtype),
            b_ptr="*fp32",
            y_ptr=_ptr(dtype),
            pre_ptr=_ptr(dtype),
            dy_ptr=_ptr(dtype),
            dpre_ptr=_ptr(dtype),
            db_part_ptr="*fp32",
            M=N,
            N=F,
            stride_xm=C,
            stride_xk=1,
            stride_wn=C,
            stride_wk=1,
            stride_ym=F,
            n_elements=N * F,
        )
        meta = dict(K=C, APPROX_TANH=True, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST_OPERANDS=False)
        tuner = G._matmul_autotuned
        for cfg in _tuner_configs(tuner, _named_args(args), meta):
            jobs.append(
                Job(
                    "linear_gelu",
                    "gpt1_kernels.linear_gelu",
                    "_matmul_autotuned",
                    dtype,
                    False,
                    args,
                    {**meta, **cfg.kwargs},
                    cfg.num_warps,
                    cfg.num_stages,
                    _config_label(cfg.kwargs, cfg.num_warps, cfg.num_stages),
                )
            )
        fwd, bwd = G.gelu_fwd_launch(), G.gelu_bwd_launch(N)
        args["blocks_per_group"] = bwd["blocks_per_group"]
        for name, launch in (("_gelu_fwd_kernel", fwd), ("_gelu_bwd_kernel", bwd)):
            blocks = {k: v for k, v in launch.items() if k.isupper()}
            jobs.append(
                Job(
                    "linear_gelu",
                    "gpt1_kernels.linear_gelu",
                    name,
                    dtype,
                    False,
                    args,
                    {"APPROX_TANH": True, **blocks},
                    launch["num_warps"],
                    3,
                    _config_label(blocks, launch["num_warps"], 3),
                )
            )
    return jobs


def cross_entropy_jobs() -> list[Job]:
    from gpt1_kernels import linear_cross_entropy as L

    _check_covered(L, {"_cross_entropy_chunk_kernel": None}, {})
    jobs = []
    for dtype in DTYPES:
        launch = L.chunk_launch(V, cuda=True)
        args = dict(logits_ptr=_ptr(dtype), targets_ptr="*i64", loss_ptr="*fp32", ignore_index=-100)
        blocks = {k: v for k, v in launch.items() if k.isupper()}
        jobs.append(
            Job(
                "linear_cross_entropy",
                "gpt1_kernels.linear_cross_entropy",
                "_cross_entropy_chunk_kernel",
                dtype,
                False,
                args,
                {"V": V, "WRITE_GRAD": True, **blocks},
                launch["num_warps"],
                3,
                _config_label(blocks, launch["num_warps"], 3),
            )
        )
    return jobs


def all_jobs() -> list[Job]:
    return attention_jobs() + add_layernorm_jobs() + linear_gelu_jobs() + cross_entropy_jobs()


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ---- one compile (runs in a worker process) ----------------------------------------------


def _worker_init(scratch: str) -> None:
    """Workers compile for the GPU: no interpreter, ptxas -v logged, Triton caches under scratch."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["SM90_REPORT_SCRATCH"] = scratch
    sys.path.insert(0, str(ROOT))
    from engine._kernels import kernels_package

    kernels_package()


def _specialise(value) -> tuple[str, list]:
    """(type, attrs) as a launch specialises the argument: pointers and 16-divisible ints get
    tt.divisibility 16 (Triton assumes tensors 16-byte aligned, as torch allocates them)."""
    from triton.runtime.jit import mangle_type

    if isinstance(value, str):
        return value, [["tt.divisibility", 16]]
    ty = mangle_type(value)
    return ty, ([["tt.divisibility", 16]] if isinstance(value, int) and value % 16 == 0 else [])


def _signature(fn, job: Job) -> tuple[dict, dict, dict]:
    """signature, constexprs and attrs of `fn` for `job`; unknown arguments are an error. Arguments
    in the kernel's do_not_specialize get neither (a launch gives them none)."""
    signature, attrs, constexprs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in job.constexprs:
            constexprs[name] = job.constexprs[name]
        elif name in job.args:
            value = job.args[name]
            specialise = not fn.params[i].do_not_specialize
            if specialise and isinstance(value, int) and not isinstance(value, bool) and value == 1:
                constexprs[name] = 1  # a launch specialises 1 as a constant
                continue
            signature[name], attr = _specialise(value)
            if attr and specialise:
                attrs[(i,)] = attr
        else:
            raise ValueError(
                f"sm90_report: {job.module}.{job.attr} has argument {name!r}, which this report "
                f"does not know: add its GPT-1 value to {job.op}_jobs() in bench/sm90_report.py"
            )
    return signature, constexprs, attrs


def _sass_loops(sass: str) -> tuple[list[int], list[int]]:
    """Innermost loops of a cuobjdump -sass listing: instructions from a backward BRA's target
    address to the BRA itself (no such loop nested inside), in program order; and the
    BAR.SYNC / BAR.RED / BAR.ARV inside them. sm_90 instructions are 16 bytes each."""
    instrs = {}  # address → instruction text
    for ln in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", ln)
        if m:
            instrs[int(m.group(1), 16)] = m.group(2)
    spans = []
    for addr, ins in instrs.items():
        m = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:  # a backward branch closes a loop (not the final self-loop)
            spans.append((int(m.group(1), 16), addr))
    inner = sorted(s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans))
    bar = re.compile(r"\bBAR\.(SYNC|RED|ARV)")
    bars = [sum(1 for addr, ins in instrs.items() if a <= addr <= b and bar.search(ins)) for a, b in inner]
    return [(b - a) // 16 + 1 for a, b in inner], bars


def compile_job(job: Job) -> Result:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(job)
    try:
        from triton.runtime.autotuner import Autotuner

        kernel = getattr(importlib.import_module(job.module), job.attr)
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel  # an Autotuner wraps its JITFunction
        signature, constexprs, attrs = _signature(fn, job)
        # an empty Triton cache per compile, so ptxas runs and logs (a hit would print nothing)
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=os.environ.get("SM90_REPORT_SCRATCH"))
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", 90, 32),
                options=dict(
                    num_warps=job.num_warps,
                    num_stages=job.num_stages,
                    **({"maxnreg": job.maxnreg} if job.maxnreg else {}),
                ),
            )
        text = log.getvalue()
        res.regs = int(re.search(r"Used (\d+) registers", text).group(1))
        res.spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
        res.smem = compiled.metadata.shared
        ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
        res.cvt = ttgir.count("ttg.convert_layout")
        res.is_matmul = "tt.dot" in ttgir or "warp_group_dot" in ttgir
        res.wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
        res.imuls = len(re.findall(r"\b(?:mul|mad)\.(?:hi|lo|wide)\.[us]32", ptx))
        res.loops, res.bars = _sass_loops(_disassemble(compiled.asm["cubin"]))
    except Exception as e:  # reported per row; the gate fails on it
        res.error = f"{type(e).__name__}: {e}"[-2000:]
    return res


def _disassemble(cubin: bytes) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout


# ---- driver ------------------------------------------------------------------------------


def tools_missing() -> str:
    """Why the report cannot run here ('' when it can): Triton or its bundled ptxas/cuobjdump absent."""
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing = [t for t in ("ptxas", "cuobjdump") if not (bin_dir / t).exists()]
    return f"no bundled {', '.join(missing)} in {bin_dir}" if missing else ""


def _cache_dir() -> Path:
    """Where results are cached, keyed by content: $GPT1_CACHE_DIR/sm90 or .cache/sm90."""
    base = os.environ.get("GPT1_CACHE_DIR")
    return (Path(base) if base else ROOT / ".cache") / "sm90"


def _cache_key(job: Job) -> str:
    """Hash of everything a result depends on: Triton's version, the kernel sources, how results
    are measured (RESULT_VERSION) and the job (its arguments, constexprs and launch options)."""
    import hashlib

    import triton

    from engine._kernels import FOLDER, NAME

    h = hashlib.sha256(f"{triton.__version__} {RESULT_VERSION}".encode())
    for f in _sources(FOLDER / (job.module.removeprefix(NAME + ".") + ".py")):
        h.update(f.read_bytes())
    h.update(repr(job).encode())
    return h.hexdigest()[:32]


def _sources(path: Path, seen: set | None = None) -> list[Path]:
    """A kernel module's file and those of the sibling modules it imports (`from .x import`), recursively."""
    seen = set() if seen is None else seen
    if path in seen or not path.exists():
        return []
    seen.add(path)
    out = [path]
    for name in re.findall(r"^from \.(\w+) import", path.read_text(), flags=re.M):
        out += _sources(path.parent / f"{name}.py", seen)
    return out


def _cached_compile(job: Job) -> Result:
    """compile_job, or its stored result when nothing it depends on changed (errors are not stored)."""
    import dataclasses
    import json

    path = _cache_dir() / f"{_cache_key(job)}.json"
    if path.exists():
        return Result(job, **json.loads(path.read_text()))
    res = compile_job(job)
    if not res.error:
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = {k: v for k, v in dataclasses.asdict(res).items() if k != "job"}
        path.write_text(json.dumps(fields))
    return res


def run(workers: int = MAX_WORKERS, cache: bool = True) -> list[Result]:
    """Lists the jobs and compiles them in a pool of at most MAX_WORKERS spawned processes (which
    import the kernels as the GPU sees them, whatever TRITON_INTERPRET the caller has); results
    in job order. With cache, a job whose inputs (see _cache_key) are unchanged is not recompiled."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="sm90-report-") as scratch,
        ProcessPoolExecutor(
            min(workers, MAX_WORKERS), mp_context=ctx, initializer=_worker_init, initargs=(scratch,)
        ) as pool,
    ):
        jobs = pool.submit(all_jobs).result()
        return list(pool.map(_cached_compile if cache else compile_job, jobs))


def markdown(results: list[Result]) -> str:
    import triton

    rows = [
        "# sm_90 compile report",
        "",
        f"Triton {triton.__version__}, target sm_90a (bundled ptxas), GPT-1 shapes B={B} T={T} H={H} D={D} "
        f"C={C} V={V}. Written by `python bench/sm90_report.py`. add_layernorm's bf16 rows are autocast's "
        "mix (x, y, dx fp32; r, dr bf16). Configs are those each autotuner keeps after its own pruning at "
        "these shapes.",
        "",
        "```",
        __doc__[__doc__.index("Columns, per compile:") :].rstrip(),
        "```",
        "",
        "| op | kernel | config | dtype | dropout | smem B | regs | regs×threads | spill B | wgmma | cvt | "
        "inner loop SASS | loop bar | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        j = r.job
        fails = r.failures()
        rows.append(
            f"| {j.op} | {j.attr} | {j.config} | {j.dtype} | {'0.1' if j.dropout else '-'} | {r.smem} | {r.regs} | "
            f"{r.regs * 32 * j.num_warps} | {r.spill} | {r.wgmma} | {r.cvt} | "
            f"{', '.join(map(str, r.loops)) or '-'} | {', '.join(map(str, r.bars)) or '-'} | "
            f"{'; '.join(fails) or 'ok'} |"
        )
    bad = sum(1 for r in results if r.failures())
    rows += ["", f"{len(results)} compiles, {bad} failing the gate (spill, > 227 KiB, bf16 matmul without wgmma)."]
    return "\n".join(rows) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT, help=f"markdown path (default {OUT.relative_to(ROOT)})")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompile everything (default: reuse results whose kernel sources, Triton version and job are unchanged)",
    )
    args = p.parse_args()
    why = tools_missing()
    if why:
        print(f"sm90_report: {why}", file=sys.stderr)
        return 1
    results = run(cache=not args.no_cache)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results))
    bad = [r for r in results if r.failures()]
    for r in bad:
        print(f"{r.job.label}: {'; '.join(r.failures())}", file=sys.stderr)
    print(f"wrote {args.out} ({len(results)} compiles, {len(bad)} failing)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
