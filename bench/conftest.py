"""Shared benchmark set-up: shapes, providers, and a side-by-side summary table.

Every benchmark records (group, provider, median seconds, work, unit) through the `record`
fixture; at the very end of the run, after pytest-benchmark's own tables, the summary prints
each group's providers side by side in physical units (GB/s for memory-bound ops, GFLOP/s
for matmul-bound ones, tokens/s for a training step) with the fused provider's speed against
eager and compile ("1.25x faster", or "1.14x slower" where fused loses).
"""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch

from engine.training.precision import cpu_bf16_isa, cpu_model

_RESULTS: dict[str, dict[str, dict]] = defaultdict(dict)


@dataclass(frozen=True)
class Shapes:
    """The small preset at a realistic 2-core training shape (override with BENCH_* env vars)."""

    B: int = int(os.environ.get("BENCH_B", 8))
    T: int = int(os.environ.get("BENCH_T", 256))
    C: int = int(os.environ.get("BENCH_C", 256))
    H: int = int(os.environ.get("BENCH_H", 4))
    V: int = int(os.environ.get("BENCH_V", 8192))
    preset: str = os.environ.get("BENCH_PRESET", "gpt1-small")  # the training step's layer count (bench/step.py)

    @property
    def F(self) -> int:
        return 4 * self.C

    @property
    def N(self) -> int:
        return self.B * self.T


SHAPES = Shapes()


def median_seconds(benchmark) -> float:
    """Median of the timed rounds; NaN under --benchmark-disable (each function ran once, untimed)."""
    stats = benchmark.stats
    return statistics.median(stats.stats.data) if stats is not None else float("nan")


def fused_cpu_error() -> str | None:
    import engine.ops

    return engine.ops.cpu_kernels_error()


@pytest.fixture
def record():
    """record(group, provider, seconds, work=None, unit=None, **extra); seconds: the median."""

    def _record(group: str, provider: str, seconds: float, work: float | None = None, unit: str | None = None, **extra):
        _RESULTS[group][provider] = dict(seconds=seconds, work=work, unit=unit, **extra)

    return _record


# (faster provider, baseline) pairs the summary prints as speed-ups when both ran
_RATIOS = [("fused", b) for b in ("eager", "compile", "sdpa", "hf")] + [
    ("fused-bf16", b) for b in ("eager-bf16", "compile-bf16", "fused")
]


def _rate(r: dict) -> str:
    if not r.get("work"):
        return ""
    return f"{r['work'] / r['seconds']:,.1f} {r['unit']}"


def speed_text(base_seconds: float, fused_seconds: float) -> str:
    """How fused compares with a baseline, in words: a ratio below 1 is a slowdown."""
    ratio = base_seconds / fused_seconds
    return f"{ratio:6.2f}x faster" if ratio >= 1 else f"{1 / ratio:6.2f}x slower"


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables (its hook has no ordering)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("GPT-1 engine benchmarks: providers side by side (medians)")
    tr.write_line(f"shapes: {SHAPES} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    tr.write_line("times are the median of each benchmark's rounds; rates are work / median time")
    tr.write_line(f"cpu: {cpu_model()}; native bf16: {cpu_bf16_isa() or 'none (bf16 GEMMs emulated)'}")
    for group in sorted(_RESULTS):
        rows = _RESULTS[group]
        tr.write_line("")
        tr.write_line(group)
        for provider, r in rows.items():
            extra = "".join(f"  {k}={v}" for k, v in r.items() if k not in ("seconds", "work", "unit"))
            tr.write_line(f"  {provider:<12} {r['seconds'] * 1e3:10.3f} ms  {_rate(r):>22}{extra}")
        for fast, base in _RATIOS:
            if fast in rows and base in rows:
                tr.write_line(f"  {fast} vs {base:<12} {speed_text(rows[base]['seconds'], rows[fast]['seconds'])}")
    for line in roofline_lines(_RESULTS):
        tr.write_line(line)


def roofline_lines(results: dict[str, dict[str, dict]]) -> list[str]:
    """Each training-step provider's GFLOP/s and its fraction of this machine's GEMM rate in its dtype
    (bench/roofline.py), when both the step and the GEMM rate were measured."""
    steps = next((rows for group, rows in results.items() if group.startswith("training step")), {})
    gemm = next((rows for group, rows in results.items() if group.startswith("GEMM rate")), {})
    lines = []
    for provider, r in steps.items():
        dtype = "bf16" if provider.endswith("-bf16") else "fp32"
        if "gflop" not in r or dtype not in gemm:
            continue
        achieved = r["gflop"] / r["seconds"]
        limit = gemm[dtype]["work"] / gemm[dtype]["seconds"]
        lines.append(
            f"  {provider:<12} {achieved:8.1f} GFLOP/s = {100 * achieved / limit:5.1f}% of the {dtype} "
            f"GEMM rate ({limit:,.1f} GFLOP/s)"
        )
    return ["", "roofline: the training step against torch's GEMMs at its own shapes", *lines] if lines else []
