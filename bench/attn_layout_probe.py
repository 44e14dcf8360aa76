"""Offline layout probe of the attention kernels: compiles fwd / dK·dV / dQ for sm_90a with Triton's
bundled ptxas (no GPU) at D=64, T=512, bf16, with and without dropout, for every autotune config,
and prints per kernel: TTGIR convert_layout count (cvt; it also counts no-op conversions between
equivalent layouts), registers, spill bytes, barriers (bar: whole kernel), and for the inner loop
over the key/query blocks off the diagonal: SASS instructions (loop), bar.sync (lbar) and
shared-memory loads/stores (lsm: what a real layout round trip costs).

    python bench/attn_layout_probe.py [fwd|dkdv|dq ...] [--configs N]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine._kernels import kernel_module  # noqa: E402

A = kernel_module("attention")

B, T, H, D = 32, 512, 12, 64
C = H * D
_INTS = dict(
    stride_qkv_b=T * 3 * C,
    stride_qkv_t=3 * C,
    stride_out_b=T * C,
    stride_out_t=C,
    stride_dout_b=T * C,
    stride_dout_t=C,
    T=T,
    H=H,
    C=C,
    drop_thresh=26,
    T_BUCKET=T,
    BH_BUCKET=B * H,
)
_PTRS = dict(
    qkv_ptr="*bf16",
    out_ptr="*bf16",
    dout_ptr="*bf16",
    dqkv_ptr="*bf16",
    lse_ptr="*fp32",
    delta_ptr="*fp32",
    seed_ptr="*i64",
    keep_ptr="*u8",
    sm_scale="fp32",
    drop_scale="fp32",
    qk_scale="fp32",
)
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
KERNELS = A._TUNED
# which loop, in program order, walks the unmasked blocks off the diagonal: fwd and dQ run it
# first, dK/dV runs the diagonal blocks first
OFF_DIAGONAL = {"fwd": 0, "dkdv": 1, "dq": 0}


def compile_one(fn, config: triton.Config, dropout: bool):
    """`fn` at `config` for sm_90a, bf16, GPT-1's strides (16-divisible where they are)."""
    constexprs = dict(HEAD_DIM=D, HAS_DROPOUT=dropout, DOT_MODE="tf32", **config.kwargs)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            continue
        signature[name] = _PTRS.get(name, "i32")
        if signature[name][0] == "*" or _INTS.get(name, 1) % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 64),
        options=dict(num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.maxnreg),
    )


def sass_of(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of every SASS instruction."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(_BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    return [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]


def loops(sass: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(start, end) addresses of the backward branches' loops, in program order, outermost merged."""
    found = []
    for addr, ins in sass:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr:
            found.append((int(m.group(1), 16), addr))
    return sorted(found)


def resources(ptx: str) -> tuple[int, int]:
    """(registers, spill-store bytes) from the bundled ptxas' -v report of the kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        err = subprocess.run(
            [str(_BIN / "ptxas"), "-v", "-arch=sm_90a", f.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", err).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", err).group(1))
    return regs, spills


def probe(name: str, config: triton.Config, dropout: bool) -> dict:
    """One row of the table: kernel `name` ("fwd", "dkdv", "dq") at `config`."""
    k = compile_one(KERNELS[name].fn, config, dropout)
    sass = sass_of(k.asm["cubin"])
    body = []
    lp = loops(sass)
    if lp:  # with BLOCK_M == BLOCK_N the diagonal's one iteration is not compiled as a loop
        start, end = lp[OFF_DIAGONAL[name]] if len(lp) == 2 else lp[0]
        body = [ins for a, ins in sass if start <= a <= end]
    regs, spills = resources(k.asm["ptx"])
    return dict(
        cvt=k.asm["ttgir"].count("ttg.convert_layout"),
        regs=regs,
        spills=spills,
        bar=sum("BAR.SYNC" in i or "BAR.ARV" in i or "BAR.RED" in i for _, i in sass),
        loop=len(body),
        loop_bar=sum("BAR.SYNC" in i for i in body),
        loop_smem=sum(bool(re.match(r"(@\S+ )?(LDS|STS|LDSM|STSM)\b", i)) for i in body),
        wgmma=sum("HGMMA" in i for i in body),
        smem=k.metadata.shared,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kernels", nargs="*", default=list(KERNELS))
    ap.add_argument("--configs", type=int, default=None, help="only the first N configs of each list")
    args = ap.parse_args()
    print(
        f"{'kernel':6} {'config':16} {'drop':4} {'cvt':>4} {'regs':>4} {'spill':>5} {'bar':>4} {'loop':>5} "
        f"{'lbar':>4} {'lsm':>4} {'smem':>6}  ratio"
    )
    for name in args.kernels:
        for cfg in KERNELS[name].configs[: args.configs]:
            tag = f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"
            tag += f" r{cfg.maxnreg}" if cfg.maxnreg else ""
            base = None
            for dropout in (False, True):
                r = probe(name, cfg, dropout)
                ratio = f"{r['loop'] / base['loop']:.2f}" if base and base["loop"] else ""
                print(
                    f"{name:6} {tag:16} {int(dropout):4} {r['cvt']:4} {r['regs']:4} {r['spills']:5} {r['bar']:4} "
                    f"{r['loop']:5} {r['loop_bar']:4} {r['loop_smem']:4} {r['smem']:6}  {ratio}",
                    flush=True,
                )
                base = base or r


if __name__ == "__main__":
    main()
