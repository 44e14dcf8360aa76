"""Elastic restarts (engine.training.elastic): which run flags a round torchrun restarted runs with,
and, end to end, a 2-process job that loses a worker to kill -9 after a checkpoint, is restarted by
torchrun and ends bit-identical to an uninterrupted run (gloo, gpt1-tiny, with dropout)."""

import json
from pathlib import Path

import pytest

from dist_runs import ROOT, losses, pretrain_args, torchrun, weights
from engine import finetune
from engine.cli import run_cli
from engine.training import elastic
from engine.training.checkpoint import RUN_CONFIG, list_checkpoints, save_checkpoint
from inference_runs import make_fixture_run

HERE = Path(__file__).resolve().parent


def a_run(out: Path, job: str | None, checkpoint: bool = True) -> Path:
    """A run directory that `job` (re)started, with one good checkpoint or none."""
    out.mkdir(parents=True)
    (out / RUN_CONFIG).write_text(json.dumps({"kind": "pretrain", elastic.SECTION: {"job": job}}))
    if checkpoint:
        save_checkpoint(out, 10, {"step": 10}, lambda d: (d / "w").write_text("w"), good=True, keep=3)
    return out


@pytest.fixture
def torchrun_env(monkeypatch):
    """This process as rank 0 of torchrun job "job-1" allowed 3 restarts, in restart round 1."""
    for name, value in {
        "TORCHELASTIC_RUN_ID": "job-1",
        "TORCHELASTIC_MAX_RESTARTS": "3",
        "TORCHELASTIC_RESTART_COUNT": "1",
        "RANK": "0",
    }.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_a_restarted_round_resumes_its_jobs_run_and_says_so_once(tmp_path, torchrun_env, capsys):
    out = a_run(tmp_path / "run", "job-1")
    assert elastic.restart_flags(out) == {"resume": str(out), "overwrite": False}
    assert capsys.readouterr().out == (
        f"torchrun restarted the workers (restart 1 on this node): continuing {out} from step_00000010 with the run's "
        f"saved settings (as --resume {out})\n"
    )
    torchrun_env.setenv("RANK", "1")
    assert elastic.restart_flags(out) == {"resume": str(out), "overwrite": False}
    assert capsys.readouterr().out == ""  # rank 0 alone says it


def test_the_jobs_run_without_a_checkpoint_starts_again(tmp_path, torchrun_env):
    out = a_run(tmp_path / "run", "job-1", checkpoint=False)
    assert elastic.restart_flags(out) == {"resume": None, "overwrite": True}


def test_a_node_that_counts_no_restart_continues_its_jobs_run_too(tmp_path, torchrun_env):
    """torchrun counts restarts per node: the node restarted for another's failure counts none."""
    torchrun_env.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    out = a_run(tmp_path / "run", "job-1")
    assert elastic.restart_flags(out) == {"resume": str(out), "overwrite": False}


@pytest.mark.parametrize(
    "recorded, env",
    [
        ("job-0", {}),  # another job's run: refused as today, restarted round or not
        (None, {}),  # a run started outside torchrun
        ("job-1", {"TORCHELASTIC_MAX_RESTARTS": "0"}),  # no restarts asked for
        ("none", {"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0"}),  # the default id names no job
    ],
)
def test_the_command_applies_as_typed_otherwise(tmp_path, torchrun_env, recorded, env):
    for name, value in env.items():
        torchrun_env.setenv(name, value)
    assert elastic.restart_flags(a_run(tmp_path / "run", recorded)) == {}


def test_the_command_applies_as_typed_outside_torchrun_and_without_a_run(tmp_path, torchrun_env):
    assert elastic.restart_flags(tmp_path / "nothing") == {}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / RUN_CONFIG).write_text("{not json")
    assert elastic.restart_flags(tmp_path / "bad") == {}
    torchrun_env.delenv("TORCHELASTIC_RUN_ID")
    assert elastic.restart_flags(a_run(tmp_path / "run", "job-1")) == {}


def test_the_default_job_id_trusts_the_restart_count(tmp_path, torchrun_env):
    torchrun_env.setenv("TORCHELASTIC_RUN_ID", "none")
    out = a_run(tmp_path / "run", "none")
    assert elastic.restart_flags(out) == {"resume": str(out), "overwrite": False}


@pytest.mark.slow
def test_a_worker_killed_after_a_checkpoint_is_restarted_and_the_run_ends_bit_identical(tmp_path):
    """torchrun --max-restarts 1: rank 1 is killed (kill -9) right after the checkpoint at update 3;
    the survivor ends (at most one line), torchrun restarts both with the same command, which continues
    the run from update 3 and exits 0 with the weights and losses of an uninterrupted run."""
    cache = tmp_path / "cache"
    args = ("--max-steps", "6", "--checkpoint-every", "3", "--dropout", "0.1")
    whole = torchrun(["-m", "engine.pretrain", *pretrain_args(tmp_path / "whole", cache, *args)], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "run"
    program = [str(HERE / "faulty_pretrain.py"), *pretrain_args(out, cache, *args)]
    proc = torchrun(program, launcher=["--max-restarts=1"], cwd=tmp_path, GPT1_TEST_FAULT="kill 1 3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    said = f"torchrun restarted the workers (restart 1 on this node): continuing {out} from step_00000003"
    assert proc.stdout.count(said) == 1, proc.stdout[-3000:]
    survivor = [line for line in proc.stderr.splitlines() if line.startswith("error: rank 0 of 2: ")]
    assert len(survivor) <= 1  # its collective failed (one line), or torchrun's SIGTERM ended it first
    a, b = weights(out), weights(tmp_path / "whole")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert losses(out) == losses(tmp_path / "whole")


def test_fine_tuning_wires_the_policy_in_too(tmp_path, torchrun_env, capsys):
    """The same fine-tuning command, rerun in round 1 of its job, continues the run; rerun by
    another job, it is refused as before. (In-process, one process: the policy reads only env.)"""
    torchrun_env.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    out = tmp_path / "ft"
    args = [
        *("--quiet", "--batch-size", "2", "--task", "rte", "--data-dir", str(ROOT / "tests/fixtures/glue/RTE")),
        *("--init", str(make_fixture_run(tmp_path / "pre")), "--out", str(out), "--max-steps", "4", "--no-fused"),
        *("--eval-every", "2", "--checkpoint-every", "2"),
    ]
    assert run_cli(finetune.main, [*args, "--stop-at", "2"]) == 0
    torchrun_env.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    capsys.readouterr()
    assert run_cli(finetune.main, args) == 0
    said = f"torchrun restarted the workers (restart 1 on this node): continuing {out} from step_00000002"
    assert said in capsys.readouterr().out
    assert list_checkpoints(out)[-1].name == "step_00000004"
    torchrun_env.setenv("TORCHELASTIC_RUN_ID", "job-2")
    assert run_cli(finetune.main, args) == 2
    assert "already holds a run" in capsys.readouterr().err
