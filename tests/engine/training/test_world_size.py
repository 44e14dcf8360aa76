"""A checkpoint is one whole file, whatever wrote it: a run resumes on another number of processes
(2 -> 1, 1 -> 2) with the same global batch (--batch-size is global, accumulation adjusts) and the
data order continuing from the global count of windows consumed; --zero1 (ZeRO-1) updates as AdamW
does and its checkpoints resume anywhere. 2 gloo processes under torchrun, gpt1-tiny, fp32, no dropout.

What is bit-exact and why: one process accumulating two micro-batches of 2 computes what two
processes of 2 do (the same forwards; DDP's mean of two gradients and the accumulated halves differ
only by a division by 2, which is exact), so a resume on another number of processes ends
bit-identical to the uninterrupted run. Not bit-exact: with dropout, each process draws from its own
RNG stream (seed + rank), which a resume on another number of processes cannot continue, so it
reseeds; ZeRO-1 runs AdamW foreach, the plain run fused (fp32 rounding, ~1e-8); the logged loss
(the mean over processes is summed in float64, one process sums in float32)."""

import pytest
import torch

from dist_runs import losses, one_thread, pretrain_args, torchrun, weights
from engine import pretrain
from engine.cli import run_cli
from engine.training.distributed import micro_batches
from helpers import assert_close

MICRO = ["--micro-batch-size", "2"]  # the same forward on 1 and 2 processes: 1 x 2 x 2 = 2 x 2 x 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """In-process runs here are compared bit for bit with one-thread workers."""
    with one_thread():
        yield


def test_every_number_of_processes_reads_the_same_global_batch():
    """The processes' micro-batches tile the global batch in order: sample i of an update is the
    same on 1, 2 or 4 processes."""
    for world, accum in ((1, 4), (2, 2), (4, 1)):
        slices = [s for rank in range(world) for s in micro_batches(rank, 2, accum)]
        assert slices == [(0, 2), (2, 2), (4, 2), (6, 2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted references (6 updates, checkpoints at 3 and 6) on 1 and 2 processes."""
    root = tmp_path_factory.mktemp("runs")
    cache = root / "cache"
    assert run_cli(pretrain.main, pretrain_args(root / "one", cache, *MICRO)) == 0
    proc = torchrun(["-m", "engine.pretrain", *pretrain_args(root / "two", cache, *MICRO)], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, cache, proc


def same(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_one_and_two_processes_compute_the_same_run(runs):
    root, _, _ = runs
    assert same(root / "one", root / "two")


@pytest.mark.slow
def test_two_processes_resumed_on_one_end_bit_identical(runs, tmp_path):
    root, cache, _ = runs
    out = tmp_path / "run"
    proc = torchrun(["-m", "engine.pretrain", *pretrain_args(out, cache, *MICRO, "--stop-at", "3")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_cli(pretrain.main, ["--resume", str(out)]) == 0
    assert same(out, root / "two")
    assert losses(out) == pytest.approx(losses(root / "two"), rel=1e-6)


@pytest.mark.slow
def test_one_process_resumed_on_two_ends_bit_identical(runs, tmp_path, capsys):
    root, cache, _ = runs
    out = tmp_path / "run"
    assert run_cli(pretrain.main, pretrain_args(out, cache, *MICRO, "--stop-at", "3")) == 0
    proc = torchrun(["-m", "engine.pretrain", "--resume", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 per forward × 1 accumulation × 2 process(es))" in proc.stdout
    assert "checkpoint written by 1 process(es), resumed on 2" in proc.stderr
    assert same(out, root / "one")


def close(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert_close(wa[k], wb[k], k)


def optimizer_line(output: str) -> str:
    (line,) = [x for x in output.splitlines() if x.startswith("optimizer state: ")]
    return line


@pytest.mark.slow
def test_zero1_updates_as_adamw_and_its_checkpoint_resumes_on_one_process(runs, tmp_path):
    """ZeRO-1's first 3 updates against AdamW's (fp32 tolerance), its state half the size per process;
    its consolidated checkpoint then resumes on one process without ZeRO-1."""
    root, cache, plain = runs
    out = tmp_path / "run"
    program = ["-m", "engine.pretrain", *pretrain_args(out, cache, *MICRO, "--zero1", "--stop-at", "3")]
    proc = torchrun(program, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole = float(optimizer_line(plain.stderr).split()[2])  # "optimizer state: X MB per process at most (replicated)"
    sharded = optimizer_line(proc.stderr)  # "... X MB per process at most (ZeRO-1: Y MB sharded over 2 processes)"
    assert float(sharded.split()[2]) < whole and f"ZeRO-1: {whole:.2f} MB sharded over 2 processes" in sharded
    step3 = "checkpoints/step_00000003"
    close(out / step3, root / "two" / step3)
    assert run_cli(pretrain.main, ["--resume", str(out)]) == 0
    close(out, root / "two")


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_under_zero1_on_two(runs, tmp_path):
    root, cache, _ = runs
    out = tmp_path / "run"
    assert run_cli(pretrain.main, pretrain_args(out, cache, *MICRO, "--stop-at", "3")) == 0
    proc = torchrun(["-m", "engine.pretrain", "--resume", str(out), "--zero1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ZeRO-1" in optimizer_line(proc.stderr)
    close(out, root / "one")
