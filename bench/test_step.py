"""Training step (forward + backward + AdamW) per provider: tokens/s, peak step memory, and the fraction of
this machine's GEMM rate at the step's own shapes it reaches (bench/roofline.py)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.training.flops import flops_per_token
from engine.training.precision import cpu_bf16_isa, cpu_model

from .conftest import SHAPES, fused_cpu_error, median_seconds
from .roofline import gemm_rate, step_gemms
from .step import PROVIDERS, build_step, step_config

ROOT = Path(__file__).resolve().parent.parent
STEP_GROUP = f"training step ({SHAPES.preset}, fwd+bwd+AdamW)"
ROOFLINE_GROUP = "GEMM rate at the training step's shapes"


def peak_step_mb(provider: str) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory", provider], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_step_mb"]


def step_flops() -> float:
    cfg = step_config()
    return flops_per_token(cfg.num_parameters(), cfg.n_layer, cfg.n_embd, SHAPES.T) * SHAPES.N


@pytest.mark.parametrize("provider", PROVIDERS)
def test_training_step(benchmark, record, provider):
    if provider == "hf":
        pytest.importorskip("transformers")
    if provider.startswith("fused") and fused_cpu_error():
        pytest.skip(fused_cpu_error())
    step = build_step(provider)
    benchmark.group = "training step"
    benchmark.pedantic(step, rounds=5, warmup_rounds=2)
    seconds = median_seconds(benchmark)
    mem = peak_step_mb(provider)
    benchmark.extra_info.update(tokens_per_s=SHAPES.N / seconds, peak_step_mb=mem)
    record(STEP_GROUP, provider, seconds, SHAPES.N, "tokens/s", peak_step_mb=mem, gflop=round(step_flops() / 1e9, 2))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gemm_roofline(benchmark, record, dtype):
    """The GEMM rate each training-step provider is measured against (one per dtype)."""
    if dtype == "bf16" and cpu_bf16_isa() is None:  # e.g. ~1 GFLOP/s on an AMD EPYC with AVX2 (2026-12-07)
        pytest.skip(f"{cpu_model()} has no native bf16: torch's bf16 GEMMs are emulated, their rate is no limit")
    gemms = step_gemms(step_config(), SHAPES.B, SHAPES.T)
    rates: list[float] = []
    benchmark.group = "GEMM roofline"
    benchmark.pedantic(
        lambda: rates.append(gemm_rate(gemms, getattr(torch, {"fp32": "float32"}.get(dtype, "bfloat16")))),
        rounds=3,
        warmup_rounds=1,
    )
    total = sum(g.flops for g in gemms)
    rate = statistics.median(rates[-3:])
    record(ROOFLINE_GROUP, dtype, total / rate, total / 1e9, "GFLOP/s")
