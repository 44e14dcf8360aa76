"""Processes (engine.training.distributed), on 2 CPU processes with gloo under torchrun: the
rendezvous of a round torchrun restarts after a worker died, one line from a failing rank, and two
"nodes" on this machine meeting at a c10d rendezvous."""

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from subprocess import PIPE

import pytest

from dist_runs import env, free_port, one_thread, pretrain_args, torchrun, weights
from engine import pretrain
from engine.cli import run_cli
from engine.training.checkpoint import list_checkpoints
from engine.training.run import LOCK_FILE

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_a_restarted_round_joins_although_its_ranks_arrive_apart(tmp_path):
    """torchrun keeps its store across restart rounds; unscoped, the first rank to arrive in round 1
    read its peer's address of round 0 (a dead process) and failed in gloo's connectFullMesh."""
    proc = torchrun([str(HERE / "rejoin_worker.py")], launcher=["--max-restarts=1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 1 rank 0: 2" in proc.stdout and "round 1 rank 1: 2" in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # tokenizer and shards shared by the runs here


@pytest.mark.slow
def test_a_failing_rank_says_so_in_one_line_and_the_others_do_not_hang(tmp_path, cache):
    """Rank 1 raises before its third update: it prints one line naming its rank and the cause; rank 0,
    left alone in a collective, ends too (its collective fails at once, or torchrun stops it); no
    traceback of ours."""
    out = tmp_path / "run"
    program = [str(HERE / "faulty_pretrain.py"), *pretrain_args(out, cache, "--max-steps", "50")]
    proc = torchrun(program, cwd=tmp_path, GPT1_TEST_FAULT="raise 1 2")
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: rank ")]
    assert [line for line in ours if line.startswith("error: rank 1 of 2: ")] == [
        "error: rank 1 of 2: RuntimeError: injected fault"
    ], proc.stderr[-4000:]
    # rank 0 ends with its own line, or silently when torchrun's SIGTERM comes first: never waiting
    assert sum(line.startswith("error: rank 0 of 2: ") for line in ours) <= 1, proc.stderr[-4000:]
    assert not re.search(r'File ".*/engine/', proc.stderr), proc.stderr[-4000:]


@pytest.mark.slow
def test_two_nodes_through_the_c10d_rendezvous_write_one_run_once(tmp_path, cache):
    """2 "nodes" x 1 process on this machine (two torchruns meeting at a c10d rendezvous on
    127.0.0.1), one --out both see (a shared filesystem): global rank 0 locks and writes it, once;
    the run computes what one process accumulating the same micro-batches does, bit for bit."""
    out, port, job = tmp_path / "run", free_port(), f"test-{uuid.uuid4().hex[:8]}"
    args = pretrain_args(out, cache, "--micro-batch-size", "2")
    rdzv = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, f"--rdzv-id={job}", "-m", "engine.pretrain", *args]
    nodes = [subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=PIPE, stderr=PIPE, text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=180) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    stdout = "".join(o for o, _ in outputs)
    assert stdout.count("GPT-1 pretraining") == 1 and "2 process(es)" in stdout  # rank 0 alone reports
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # each update logged once
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003", "step_00000006"]
    leftovers = [p.name for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.name.startswith(".")]
    assert leftovers == [LOCK_FILE]  # no temporaries, no second writer's trash
    assert json.loads((out / "train_config.json").read_text())["elastic"] == {"job": job}
    one = tmp_path / "one"
    with one_thread():  # as the workers compute (a GEMM's rounding depends on the thread count)
        assert run_cli(pretrain.main, pretrain_args(one, cache, "--micro-batch-size", "2")) == 0
    a, b = weights(out), weights(one)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
