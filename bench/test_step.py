"""Training step (forward + backward + AdamW) per provider: tokens/s and peak step memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SHAPES, fused_cpu_error, median_seconds
from .step import PROVIDERS, build_step

ROOT = Path(__file__).resolve().parent.parent


def peak_step_mb(provider: str) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory", provider], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_step_mb"]


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
    record("training step (small preset, fwd+bwd+AdamW)", provider, seconds, SHAPES.N, "tokens/s", peak_step_mb=mem)
