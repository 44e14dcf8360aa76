"""engine/training/flops.py: the one FLOPs / MFU formula, shared by the trainer and bench/gpu_check.py."""

from __future__ import annotations

import pytest

from engine import GPT1Config
from engine.training import flops
from engine.training import trainer as train


def test_gpt1_flops_per_token_by_hand():
    cfg = GPT1Config.from_name("gpt1")
    n = cfg.num_parameters()
    # 6 per parameter (fwd 2 + bwd 4) + causal attention: 2 matmuls · 2·T·C / 2 · 3, per layer
    assert flops.flops_per_token(n, cfg.n_layer, cfg.n_embd, 512) == 6 * n + 6 * 12 * 512 * 768


def test_the_trainer_uses_the_same_peaks():
    assert train.PEAK_BF16_FLOPS is flops.PEAK_BF16_FLOPS


def test_peak_lookup_and_mfu():
    assert flops.peak_bf16_flops("NVIDIA H200") == 989e12
    assert flops.peak_bf16_flops("some CPU") is None
    assert flops.mfu(1e9, 500.0, 1e12) == pytest.approx(0.5)
