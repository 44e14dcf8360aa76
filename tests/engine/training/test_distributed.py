"""Joining a torchrun job (engine.training.distributed): the rendezvous of a round that torchrun
restarts after a worker died, on 2 CPU processes with gloo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent


def torchrun(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_restarted_round_joins_although_its_ranks_arrive_apart(tmp_path):
    """torchrun keeps its store across restart rounds; unscoped, the first rank to arrive in round 1
    read its peer's address of round 0 (a dead process) and failed in gloo's connectFullMesh."""
    proc = torchrun("--max-restarts=1", str(HERE / "rejoin_worker.py"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 1 rank 0: 2" in proc.stdout and "round 1 rank 1: 2" in proc.stdout, proc.stdout
