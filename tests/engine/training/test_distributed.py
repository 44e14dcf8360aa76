"""Processes (engine.training.distributed), on 2 CPU processes with gloo under torchrun: the
rendezvous of a round torchrun restarts after a worker died, one line from a failing rank."""

import re
from pathlib import Path

import pytest

from dist_runs import pretrain_args, torchrun

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
    left alone in a collective, ends too with its own line; no traceback of ours."""
    out = tmp_path / "run"
    program = [str(HERE / "faulty_pretrain.py"), *pretrain_args(out, cache, "--max-steps", "50")]
    proc = torchrun(program, cwd=tmp_path, GPT1_TEST_FAULT="raise 1 2")
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: rank ")]
    assert [line for line in ours if line.startswith("error: rank 1 of 2: ")] == [
        "error: rank 1 of 2: RuntimeError: injected fault"
    ], proc.stderr[-4000:]
    assert sum(line.startswith("error: rank 0 of 2: ") for line in ours) == 1, proc.stderr[-4000:]
    assert not re.search(r'File ".*/engine/', proc.stderr), proc.stderr[-4000:]
