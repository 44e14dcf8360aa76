"""bench/roofline.py: the step's GEMM list accounts for its FLOPs, and the summary's fraction of the GEMM rate."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bench.roofline import Gemm, gemm_rate, step_gemms
from engine.model.config import GPT1Config
from engine.training.flops import flops_per_token

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset,batch,seq_len", [("gpt1-small", 16, 128), ("gpt1", 2, 512)])
def test_the_gemms_are_the_steps_flops(preset, batch, seq_len):
    """engine.training.flops' count, exactly, once two things are set apart: the formula counts every parameter
    (biases, LayerNorms, position embeddings: no GEMM) and halves attention for the causal mask."""
    cfg = GPT1Config.from_name(preset, vocab_size=2048 if preset == "gpt1-small" else 40478)
    gemms = step_gemms(cfg, batch, seq_len)
    attention = sum(g.flops for g in gemms if g.name.startswith("attention"))
    matmul_params = cfg.n_layer * 12 * cfg.n_embd**2 + cfg.vocab_size * cfg.n_embd
    formula = flops_per_token(cfg.num_parameters(), cfg.n_layer, cfg.n_embd, seq_len) * batch * seq_len
    not_gemm = 6 * (cfg.num_parameters() - matmul_params) * batch * seq_len
    assert sum(g.flops for g in gemms) - attention / 2 == pytest.approx(formula - not_gemm, rel=1e-12)


def test_gemm_rate_is_flops_over_time():
    rate = gemm_rate([Gemm("a", 64, 32, 16, count=2), Gemm("b", 8, 8, 8, count=1, batch=3)], torch.float32, repeats=1)
    assert 0 < rate < float("inf")


def test_summary_states_each_provider_against_its_dtypes_rate():
    spec = importlib.util.spec_from_file_location("bench_conftest_roofline", ROOT / "bench" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    results = {
        "training step (gpt1-small, fwd+bwd+AdamW)": {
            "fused": {"seconds": 0.5, "gflop": 50.0},
            "fused-bf16": {"seconds": 0.25, "gflop": 50.0},
        },
        "GEMM rate at the training step's shapes": {
            "fp32": {"seconds": 0.25, "work": 50.0},
            "bf16": {"seconds": 0.05, "work": 50.0},
        },
    }
    lines = module.roofline_lines(results)
    assert any("fused " in x and "50.0% of the fp32 GEMM rate (200.0 GFLOP/s)" in x for x in lines), lines
    assert any("fused-bf16" in x and "20.0% of the bf16 GEMM rate (1,000.0 GFLOP/s)" in x for x in lines), lines
