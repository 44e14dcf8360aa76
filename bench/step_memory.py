"""Peak memory of real training steps against engine.training.memory's estimate.

    python -m bench.step_memory --preset gpt1-small --seq-len 128 --micro-batch 16 [--no-fused]
    → one JSON line: {"preset", "fused", "precision", "micro_batch", "measured_mb", "estimate_mb", ...}

Measured in this fresh process: the kernel's peak RSS (VmHWM, reset through /proc/self/clear_refs
once the imports and a warm-up step on a tiny model are done) over building the model and
Trainer (optimizer) and two updates of Trainer.train_step, less the RSS just before: weights,
gradients, Adam state, the batch, activations and every temporary, under the allocator
settings a run has. The estimate leaves out the prefetcher's batches (they are not held here).
A memory measurement, not a timing: it means the same on a busy machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile

import torch

from engine.model.config import GPT1Config
from engine.model.gpt1 import GPT1
from engine.training.config import TrainConfig
from engine.training.memory import Step
from engine.training.precision import autocast_dtype
from engine.training.trainer import Job, Trainer

from .memory import status_kb


def _steps(config: GPT1Config, cfg: TrainConfig, batch: torch.Tensor, updates: int) -> None:
    torch.manual_seed(0)
    model = GPT1(config, fused=cfg.fused)
    job = Job(lambda m, b: m(b[:, :-1], targets=b[:, 1:]).loss, lambda *a: batch)
    trainer = Trainer(model, cfg, job, progress=False)
    for _ in range(updates):
        trainer.train_step([batch])


def measure(config: GPT1Config, seq_len: int, micro: int, fused: bool, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=out, batch_size=micro, max_steps=10, fused=fused, precision=precision, device="cpu")
        tiny = GPT1Config.from_name("gpt1-tiny", vocab_size=64)
        _steps(tiny, TrainConfig(**{**cfg.__dict__, "batch_size": 2}), torch.randint(0, 64, (2, 9)), 1)  # warm-up
        gc.collect()
        batch = torch.randint(0, config.vocab_size, (micro, seq_len + 1))
        baseline = status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        _steps(config, cfg, batch, 2)
        peak = status_kb("VmHWM")
    bf16 = autocast_dtype(cfg, torch.device("cpu")) is not None
    est = Step(config, seq_len, fused, bf16, "cpu").peak(micro)
    return {
        "fused": fused,
        "bf16": bf16,
        "micro_batch": micro,
        "seq_len": seq_len,
        "measured_mb": round((peak - baseline) / 1024, 1),
        "estimate_mb": round((est.total - est.data) / 2**20, 1),
        "activations_mb": round(est.activations / 2**20, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.step_memory", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt1-small")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    a = p.parse_args()
    config = GPT1Config.from_name(a.preset, vocab_size=a.vocab_size)
    print(json.dumps({"preset": a.preset, **measure(config, a.seq_len, a.micro_batch, a.fused, a.precision)}))


if __name__ == "__main__":
    main()
