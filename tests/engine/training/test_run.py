"""The run lifecycle both CLIs share (engine.training.run): the run-directory lock, one resume policy,
the run's own tokenizer and kernels on resume, exit codes for environment faults, one-line
errors for bad run files, and pretraining from an existing model (--init). Tiny settings:
each run is a few updates of a 2-layer model on ~25 kB of text."""

import contextlib
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from engine import GPT1, GPT1Config, finetune, pretrain
from engine.cli import run_cli
from engine.data.corpus import shakespeare_dir
from engine.model.tokenizer import BPETokenizer
from engine.training import run
from helpers import assert_close
from inference_runs import make_fixture_run

ROOT = Path(__file__).resolve().parents[3]
FIX = ROOT / "tests" / "fixtures"
RTE = FIX / "glue" / "RTE"
POEMS = ["lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt", "phoenix_and_the_turtle_gut.txt"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def pre_args(out, cache, *extra, data=None):
    return [
        "--data",
        *(data or [str(shakespeare_dir() / p) for p in POEMS]),
        "--preset",
        "gpt1-tiny",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--vocab-size",
        "300",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        "--eval-windows",
        "2",
        "--final-eval-windows",
        "4",
        "--sample-tokens",
        "0",
        "--log-every",
        "1",
        "--no-fused",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        *extra,
    ]


def cli(main, argv, capsys):
    code = run_cli(main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny run directory in the pretraining CLI's layout (weights + tokenizer)."""
    return make_fixture_run(tmp_path_factory.mktemp("pretrained"))


def ft_args(out, init, *extra):
    return [
        "--quiet",
        "--batch-size",
        "2",
        "--task",
        "rte",
        "--data-dir",
        str(RTE),
        "--init",
        str(init),
        "--out",
        str(out),
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        *extra,
    ]


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


# ---- the lock ----------------------------------------------------------------------------------


def test_lock_names_the_directory_and_the_holders_pid(tmp_path):
    out = tmp_path / "run"
    with run.RunLock(out):
        with pytest.raises(run.UserError) as e:
            run.RunLock(out).acquire()
    msg = str(e.value)
    assert str(out) in msg and f"pid {os.getpid()}" in msg
    with run.RunLock(out):  # released: free again
        pass


@contextlib.contextmanager
def held_lock(out: Path) -> Iterator[subprocess.Popen]:
    """Another process holding out's run lock for the with block."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from engine.training.run import RunLock; l = RunLock(sys.argv[1]); l.acquire(); "
            "print('locked', flush=True); time.sleep(120)",
            str(out),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_second_run_on_one_out_fails_at_once(tmp_path, cache, capsys):
    """Probe 2: a second run on a locked --out fails with one line, writing nothing there."""
    out = tmp_path / "run"
    with held_lock(out) as holder:
        for main, argv in (
            (pretrain.main, pre_args(out, cache)),
            (finetune.main, ["--no-fused", *ft_args(out, tmp_path)]),
        ):
            code, _, err = cli(main, argv, capsys)
            assert code == 2 and one_line(err), err
            assert str(out) in err and f"pid {holder.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == [run.LOCK_FILE]


@pytest.mark.slow
def test_torchrun_on_a_locked_out_fails_on_every_rank(tmp_path, cache):
    """Two gloo ranks against a run directory another process holds: rank 0 cannot take the
    lock and tells rank 1, so neither waits on the other; the job exits non-zero with the
    one-line message, no traceback of ours, and nothing written there."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "engine.pretrain",
        *pre_args(out, cache),
    ]
    with held_lock(out) as holder:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0, proc.stdout[-2000:]
        ours = [line for line in proc.stderr.splitlines() if str(out) in line and f"pid {holder.pid}" in line]
        assert len(ours) == 1, proc.stderr[-4000:]  # rank 0 says it, once for the job
        assert not re.search(r'File ".*/engine/', proc.stderr), proc.stderr[-4000:]
        assert sorted(p.name for p in out.iterdir()) == [run.LOCK_FILE]


def test_a_failed_start_leaves_no_directory(tmp_path, cache, capsys):
    out = tmp_path / "out"
    code, _, err = cli(pretrain.main, pre_args(out, cache, data=[str(tmp_path / "nope.txt")]), capsys)
    assert code == 2 and "not found" in err and not out.exists()
    out.mkdir()  # a directory the user made stays, without a lock file left in it
    code, _, err = cli(pretrain.main, pre_args(out, cache, data=[str(tmp_path / "nope.txt")]), capsys)
    assert code == 2 and out.is_dir() and not any(out.iterdir())


# ---- pretraining resume: the run's tokenizer, the run's settings ----------------------------------


def test_pretrain_resume_keeps_the_runs_tokenizer(tmp_path, capsys):
    """Probe 1: resume on a cleared cache used to retrain the BPE, overwrite tokenizer.json and
    continue the checkpoint on other ids. Here the cache holds a different tokenizer under the
    same key: resume must still use the run's own tokenizer.json, bit for bit."""
    cache = tmp_path / "cache"
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert cli(pretrain.main, pre_args(whole, cache), capsys)[0] == 0
    assert cli(pretrain.main, pre_args(part, cache, "--stop-at", "2"), capsys)[0] == 0
    tok_bytes = (part / "tokenizer.json").read_bytes()
    (cached,) = (cache / "tokenizers").iterdir()
    BPETokenizer.train(texts=["completely different text, other merges"] * 20, vocab_size=300).save(cached)
    code, out, err = cli(pretrain.main, ["--resume", str(part)], capsys)
    assert code == 0, err
    assert "training a" not in out and (part / "tokenizer.json").read_bytes() == tok_bytes
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_resume_keeps_the_reference_path(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert cli(pretrain.main, pre_args(out, cache, "--stop-at", "2"), capsys)[0] == 0
    code, _, err = cli(pretrain.main, ["--resume", str(out), "--fused"], capsys)
    assert code == 2 and one_line(err) and "--fused" in err
    code, stdout, err = cli(pretrain.main, ["--resume", str(out), "--max-steps", "5", "--eval-every", "1"], capsys)
    assert code == 0, err  # run-control flags may change
    assert "reference ops" in stdout
    assert json.loads((out / "train_config.json").read_text())["train"]["max_steps"] == 5
    before = (out / "model.safetensors").read_bytes()
    code, stdout, err = cli(pretrain.main, ["--resume", str(out), "--max-steps", "5"], capsys)
    assert code == 0 and "already finished at update 5" in stdout, err
    assert (out / "model.safetensors").read_bytes() == before


def test_pretrain_resume_on_a_finetuning_run_is_one_line(pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    assert cli(finetune.main, ["--no-fused", *ft_args(out, pretrained, "--stop-at", "2")], capsys)[0] == 0
    code, _, err = cli(pretrain.main, ["--resume", str(out)], capsys)
    assert code == 2 and one_line(err), err
    assert "engine.finetune" in err and str(out / "train_config.json") in err


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"kind": "pretrain", "pretrain": {}, "train": {"max_steps": "many"}}', "--max-steps must be an integer"),
        ('{"kind": "pretrain", "pretrain": {"bogus": 1}, "train": {}}', "bogus"),
        ("[1, 2]", "not a run configuration"),
    ],
)
def test_bad_train_config_names_the_file(content, message, tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert cli(pretrain.main, pre_args(out, cache, "--stop-at", "2"), capsys)[0] == 0
    (out / "train_config.json").write_text(content)
    code, _, err = cli(pretrain.main, ["--resume", str(out)], capsys)
    assert code == 2 and one_line(err), err
    assert str(out / "train_config.json") in err and message in err


# ---- environment faults: exit 1, one line naming the file, nothing finished lost ----------------------


@pytest.mark.parametrize("code_", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_is_one_line_exit_1(code_, tmp_path, cache, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def failing_save(obj, f, *a, **k):  # the second checkpoint's trainer state hits the fault
        calls.append(f)
        if len(calls) >= 2:
            raise OSError(code_, os.strerror(code_), str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    code, _, err = cli(pretrain.main, pre_args(out, cache), capsys)
    assert code == 1 and "Traceback" not in err, err
    assert err.rstrip("\n").split("\n")[-1].startswith("error: "), err  # after the progress bar: one line
    assert os.strerror(code_) in err and str(out) in err
    monkeypatch.setattr(torch, "save", real_save)
    state = torch.load(out / "checkpoints" / "step_00000002" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2  # the finished checkpoint is intact


@pytest.mark.parametrize(
    "error, code",
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "in.txt"), 2),  # the user named a missing file
        (PermissionError(errno.EACCES, "Permission denied", "/ro/run"), 1),
        (OSError(errno.ENOSPC, "No space left on device", "/full/run/x"), 1),
    ],
)
def test_run_cli_exit_codes(error, code, capsys):
    def main(argv):
        raise error

    assert run_cli(main, []) == code
    err = capsys.readouterr().err
    assert one_line(err) and error.filename in err and error.strerror in err


# ---- fine-tuning resume: one policy ------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag", [["--lr", "1e-3"], ["--task", "sst2"], ["--batch-size", "4"], ["--lm-coef", "0.25"], ["--fused"]]
)
def test_finetune_resume_refuses_changed_settings(flag, pretrained, tmp_path, capsys):
    """Probe 4: these used to be dropped silently (and --no-fused runs resumed fused)."""
    out = tmp_path / "run"
    assert cli(finetune.main, ["--no-fused", *ft_args(out, pretrained, "--stop-at", "2")], capsys)[0] == 0
    code, _, err = cli(finetune.main, ["--resume", str(out), *flag], capsys)
    assert code == 2 and one_line(err), err
    assert f"--resume cannot change {flag[0]}" in err


def test_finetune_resume_keeps_the_reference_path_bit_exact(pretrained, tmp_path, capsys):
    """The resumed run is the run's own: its kernels, tokenizer and model config — the --init
    directory is not read again (here it is gone)."""
    import shutil

    init = tmp_path / "init"
    shutil.copytree(pretrained, init)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli(finetune.main, ["--no-fused", *ft_args(whole, init)], capsys)[0] == 0
    assert cli(finetune.main, ["--no-fused", *ft_args(split, init, "--stop-at", "2")], capsys)[0] == 0
    shutil.rmtree(init)
    code, stdout, err = cli(finetune.main, ["--resume", str(split)], capsys)  # no --no-fused: the run's setting holds
    assert code == 0, err
    assert '"fused": false' in stdout
    for name in ("model.safetensors", "head.safetensors"):
        assert (split / name).read_bytes() == (whole / name).read_bytes(), name


def test_finetune_resume_of_a_finished_run_keeps_the_best_weights(pretrained, tmp_path, capsys):
    """Probe 3: the final weights used to overwrite the best-dev ones. A tiny lr changes every
    weight's low bits but no prediction, so the best dev step is the first evaluation."""
    out = tmp_path / "run"
    assert cli(finetune.main, ["--no-fused", *ft_args(out, pretrained, "--lr", "1e-6")], capsys)[0] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_step"] == 2 and metrics["steps"] == 4
    before = {n: (out / n).read_bytes() for n in ("model.safetensors", "head.safetensors", "metrics.json")}
    code, stdout, err = cli(finetune.main, ["--resume", str(out)], capsys)
    assert code == 0, err
    assert {n: (out / n).read_bytes() for n in before} == before
    assert "already finished" in stdout
    # More updates for a finished run: the best-dev weights stay the run's unless beaten.
    code, _, err = cli(finetune.main, ["--resume", str(out), "--max-steps", "6"], capsys)
    assert code == 0, err
    after = json.loads((out / "metrics.json").read_text())
    assert after["steps"] == 6 and after["best_step"] == 2
    assert all((out / n).read_bytes() == before[n] for n in ("model.safetensors", "head.safetensors"))


def test_finetune_bad_head_file_is_one_line(pretrained, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(finetune.main, ["--no-fused", *ft_args(out, pretrained, "--max-steps", "1")], capsys)[0] == 0
    (out / "head.safetensors").write_bytes(b"garbage")
    code, _, err = cli(finetune.main, ["--no-fused", "--eval-only", "--init", str(out)], capsys)
    assert code == 2 and one_line(err), err
    assert str(out / "head.safetensors") in err


# ---- finetune --init none on its own ---------------------------------------------------------------


def test_init_none_with_preset_and_tokenizer_outside_a_project(pretrained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/pretrain here
    out = tmp_path / "scratch"
    argv = [
        "--no-fused",
        *ft_args(
            out, "none", "--preset", "gpt1-tiny", "--tokenizer", str(pretrained / "tokenizer.json"), "--max-steps", "1"
        ),
    ]
    code, _, err = cli(finetune.main, argv, capsys)
    assert code == 0, err
    assert GPT1.from_pretrained(out, fused=False).config.n_layer == GPT1Config.from_name("gpt1-tiny").n_layer


def test_init_none_with_arch_reads_only_config_and_tokenizer(pretrained, tmp_path, capsys):
    arch = tmp_path / "arch"
    arch.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (arch / name).write_bytes((pretrained / name).read_bytes())  # no weights
    out = tmp_path / "scratch"
    code, _, err = cli(
        finetune.main, ["--no-fused", *ft_args(out, "none", "--arch", str(arch), "--max-steps", "1")], capsys
    )
    assert code == 0, err


def test_init_none_alone_says_what_it_needs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(finetune.main, ["--no-fused", "--init", "none"], capsys)
    assert code == 2 and one_line(err), err
    assert "--preset" in err and "--tokenizer" in err and "--arch" in err
    assert "or --init none" not in err  # it was given


# ---- pretraining from a model (--init) ---------------------------------------------------------------


def test_pretrain_init_continues_a_model_on_new_text_as_a_new_run(tmp_path, cache, capsys):
    base = tmp_path / "base"
    assert cli(pretrain.main, pre_args(base, cache), capsys)[0] == 0
    new_text = tmp_path / "new.txt"
    new_text.write_text(
        "\n\n".join((shakespeare_dir() / "sonnets_gut.txt").read_text(encoding="utf-8").split("\n\n")[:200])
    )
    out = tmp_path / "cont"
    argv = [
        "--init",
        str(base),
        "--data",
        str(new_text),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "1",
        "--lr",
        "1e-9",
        "--eval-every",
        "0",
        "--sample-tokens",
        "0",
        "--no-fused",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]
    code, stdout, err = cli(pretrain.main, argv, capsys)
    assert code == 0, err
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert "training a" not in stdout
    a, b = GPT1.from_pretrained(base, fused=False), GPT1.from_pretrained(out, fused=False)
    assert a.config == b.config
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert_close(y, x, k)  # lr 1e-9: one update moves nothing visible — the weights came from --init
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1]  # a fresh schedule: update 1 of 1
    code, _, err = cli(pretrain.main, [*argv[:4], "--preset", "gpt1-small", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and one_line(err) and "--preset" in err and "--init" in err


def test_pretrain_init_reads_a_hugging_face_directory(tmp_path, cache, capsys):
    """An openai-gpt layout: config.json + model.safetensors + vocab.json + merges.txt."""
    hf = tmp_path / "hf"
    hf.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {
        "<unk>": 0,
        **{c: i + 1 for i, c in enumerate(letters)},
        **{c + "</w>": i + 27 for i, c in enumerate(letters)},
    }
    (hf / "vocab.json").write_text(json.dumps(vocab))
    (hf / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    GPT1(
        GPT1Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2), fused=False
    ).save_pretrained(hf)
    out = tmp_path / "cont"
    argv = [
        "--init",
        str(hf),
        "--data",
        *[str(shakespeare_dir() / p) for p in POEMS],
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--eval-every",
        "0",
        "--sample-tokens",
        "0",
        "--no-fused",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]
    code, _, err = cli(pretrain.main, argv, capsys)
    assert code == 0, err
    assert GPT1.from_pretrained(out, fused=False).config.vocab_size == len(vocab)
    assert BPETokenizer.load(out / "tokenizer.json").vocab_size == len(vocab)


# ---- fine-tuning's plot ---------------------------------------------------------------------------


def test_finetune_plots_the_task_loss_and_dev_accuracy(pretrained, tmp_path, capsys, monkeypatch):
    from engine.training.metrics_log import MetricsLog

    calls = []
    monkeypatch.setattr(MetricsLog, "plot", lambda self, path, **k: calls.append((path, k)))  # a plot taking panels
    out = tmp_path / "run"
    assert cli(finetune.main, ["--no-fused", *ft_args(out, pretrained, "--max-steps", "2")], capsys)[0] == 0
    panels = calls[-1][1].get("panels") or ()
    keys = {key for _, series in panels for key, _ in series}
    labels = [label for label, _ in panels]
    assert {"loss", "task_loss", "dev_accuracy"} <= keys
    assert not any("cross-entropy" in label for label in labels)
