"""The memory preflight (issue 23, fault 3): what autograd saves is counted exactly for each
path and precision, the estimate bounds the peak RSS of real steps on two presets and both
paths, and a step beyond what the device has is refused in one line naming the estimate, the
limit and the --micro-batch-size that fits."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.cli import UserError
from engine.model.config import GPT1Config
from engine.model.gpt1 import GPT1
from engine.training import memory
from engine.training.memory import Step

ROOT = Path(__file__).resolve().parents[3]


def needs_cpu_kernels(fused: bool) -> None:
    if fused:
        from engine import ops

        if ops.cpu_kernels_error() is not None:
            pytest.skip(ops.cpu_kernels_error())


def hooked_bytes(config: GPT1Config, batch: int, seq_len: int, fused: bool, bf16: bool) -> int:
    """Bytes of the distinct storages autograd saves in one training forward (weights aside)."""
    torch.manual_seed(0)
    model = GPT1(config, fused=fused).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, bf16):
        model(ids[:, :-1], targets=ids[:, 1:])
    return sum(seen.values())


# awkward shapes: a prime sequence length, 3 heads of 16, an FFN that is not 4 * n_embd
CONFIGS = {
    "tiny": (GPT1Config.from_name("gpt1-tiny", vocab_size=256), 32),
    "odd": (GPT1Config(vocab_size=301, n_positions=64, n_embd=48, n_layer=3, n_head=3, n_inner=100), 23),
    "no dropout": (GPT1Config.from_name("gpt1-tiny", vocab_size=256, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0), 17),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_saved_bytes_per_sequence_are_what_autograd_saves(name, fused, bf16):
    needs_cpu_kernels(fused)
    config, T = CONFIGS[name]
    step = Step(config, T, fused, bf16, "cpu")
    # from 2 sequences on: at 1 the reference's targets need no copy
    counted = hooked_bytes(config, 5, T, fused, bf16) - hooked_bytes(config, 2, T, fused, bf16)
    assert step.saved(5) - step.saved(2) == counted


def measured(preset: str, vocab: int, seq_len: int, micro: int, fused: bool) -> dict:
    argv = [sys.executable, "-m", "bench.step_memory", "--preset", preset, "--vocab-size", str(vocab)]
    argv += ["--seq-len", str(seq_len), "--micro-batch", str(micro), "--fused" if fused else "--no-fused"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("preset, vocab, seq_len, micro", [("gpt1-tiny", 256, 64, 256), ("gpt1-small", 2048, 128, 32)])
def test_the_estimate_bounds_the_peak_rss_of_real_steps(preset, vocab, seq_len, micro, fused):
    """Peak RSS of building the model and two Trainer.train_step updates in a fresh process
    (bench/step_memory.py): never above the estimate, and the estimate not far above it."""
    needs_cpu_kernels(fused)
    got = measured(preset, vocab, seq_len, micro, fused)
    assert got["measured_mb"] <= got["estimate_mb"] <= 1.5 * got["measured_mb"], got


def test_a_step_beyond_the_limit_is_refused_naming_the_estimate_limit_and_what_fits(monkeypatch):
    """The issue's batch: gpt1-small, 64 tokens, 200,000 sequences per update."""
    step = Step(GPT1Config.from_name("gpt1-small", vocab_size=2048), 64, True, False, "cpu")
    monkeypatch.setattr(memory, "available", lambda device: (16 * 10**9, "MemAvailable"))
    with pytest.raises(UserError) as caught:
        memory.preflight(step, 200_000, 200_000, torch.device("cpu"), resident=15 * 10**6)
    need = step.peak(200_000)
    fits = memory.fitting_micro_batch(step, 200_000, 16 * 10**9 + 15 * 10**6)
    assert 200_000 % fits == 0 and step.peak(fits).total <= 16.015e9
    larger = min(d for d in range(fits + 1, 200_001) if 200_000 % d == 0)
    assert step.peak(larger).total > 16.015e9
    assert str(caught.value) == (
        f"a training step needs about {need.total / 1e9:.1f} GB ({need.activations / 1e9:.1f} GB of activations "
        "for 200000 sequences of 64 tokens per forward, 60 MB of weights, gradients and Adam state), more than "
        f"the 16.0 GB available (MemAvailable); --micro-batch-size {fits} fits (gradient accumulation keeps "
        "--batch-size)"
    )
    assert need.total > 800e9  # 4 layers of 64 bytes per token and channel, 12.8M tokens: no machine has it
    assert memory.preflight(step, fits, 200_000, torch.device("cpu"), resident=15 * 10**6) == step.peak(fits)


def test_when_nothing_fits_the_line_says_so(monkeypatch):
    step = Step(GPT1Config.from_name("gpt1"), 512, False, False, "cpu")
    monkeypatch.setattr(memory, "available", lambda device: (10**9, "MemAvailable"))
    with pytest.raises(UserError, match="even one sequence per forward does not fit: use a smaller --preset"):
        memory.preflight(step, 8, 8, torch.device("cpu"))


def test_available_memory_is_the_lower_of_meminfo_and_the_cgroup(tmp_path):
    free, source = memory.available(torch.device("cpu"))
    assert 0 < free and source in ("MemAvailable", "the cgroup's memory limit")
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("1000000\n")
    (v2 / "memory.current").write_text("600000\n")
    (v2 / "memory.stat").write_text("anon 500000\ninactive_file 50000\n")
    assert memory._cgroup_free(v2, "memory.max", "memory.current", ("memory.stat", "inactive_file")) == 450000
    (v2 / "memory.max").write_text("max\n")
    assert memory._cgroup_free(v2, "memory.max", "memory.current", ("memory.stat", "inactive_file")) is None
    assert memory._cgroup_free(tmp_path / "none", "memory.max", "memory.current", ("memory.stat", "x")) is None


def test_check_model_reads_the_run_s_settings(monkeypatch, tmp_path):
    from engine.training.config import TrainConfig
    from engine.training.distributed import DistEnv

    model = GPT1(GPT1Config.from_name("gpt1-tiny", vocab_size=256), fused=False)
    cfg = TrainConfig(out=str(tmp_path), batch_size=64, micro_batch_size=16, precision="fp32", fused=False)
    step = Step(model.config, 32, False, False, "cpu", cfg.prefetch)
    weights = 4 * model.config.num_parameters()
    monkeypatch.setattr(memory, "available", lambda device: (step.peak(16).total - weights, "MemAvailable"))
    assert memory.check_model(model, cfg, 32, DistEnv()) == step.peak(16)  # the weights are already there
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two CPU processes share the machine
    fits = memory.fitting_micro_batch(step, 64, (step.peak(16).total - weights) // 2 + weights)
    assert fits in (1, 2, 4, 8)
    with pytest.raises(
        UserError, match=rf"MB available \(MemAvailable, shared by 2 processes\); --micro-batch-size {fits} "
    ):
        memory.check_model(model, cfg, 32, DistEnv())


def test_a_fine_tuning_sample_counts_each_of_its_sequences(monkeypatch):
    config = GPT1Config.from_name("gpt1-tiny", vocab_size=256)
    choices, single = Step(config, 64, True, False, "cpu", sequences=4), Step(config, 64, True, False, "cpu")
    assert choices.peak(8).total == single.peak(32).total and choices.peak(8).batch == 8
    monkeypatch.setattr(memory, "available", lambda device: (10**6, "MemAvailable"))
    with pytest.raises(UserError, match="for 8 examples of 4 sequences of 64 tokens per forward"):
        memory.preflight(choices, 8, 8, torch.device("cpu"))
