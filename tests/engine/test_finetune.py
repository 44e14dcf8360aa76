"""The fine-tuning CLI end to end, on fixture files and a tiny "pretrained" run made here
(GPT1(...).save_pretrained + a tokenizer), so nothing waits on the pretraining CLI."""

import json
from pathlib import Path

import pytest
import torch

import engine.training.precision as precision
from engine import GPT1
from engine.cli import run_cli
from engine.data.splits import ExampleBatches
from engine.data.transforms import Encoded
from engine.finetune import CPU_LR, PAPER_TRAIN, FinetuneConfig, _resolve_train_config, main
from engine.model.heads import add_task_tokens
from engine.model.tokenizer import BPETokenizer
from inference_runs import make_fixture_run

FIX = Path(__file__).resolve().parents[1] / "fixtures"
GLUE = FIX / "glue"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny run directory in the pretraining CLI's layout."""
    return make_fixture_run(tmp_path_factory.mktemp("pretrained"))


def finetune(args: list[str]) -> int:
    return run_cli(main, ["--no-fused", "--quiet", "--batch-size", "2", *args])


def read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_end_to_end_entailment_then_eval_only(pretrained, tmp_path, capsys):
    out = tmp_path / "rte"
    rc = finetune(
        [
            "--task",
            "rte",
            "--data-dir",
            str(GLUE / "RTE"),
            "--init",
            str(pretrained),
            "--out",
            str(out),
            "--max-steps",
            "4",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    for name in (
        "config.json",
        "model.safetensors",
        "head.safetensors",
        "tokenizer.json",
        "task.json",
        "metrics.json",
        "metrics.jsonl",
        "loss.png",
        "dev_predictions.tsv",
    ):
        assert (out / name).is_file(), name
    assert not (out / "best").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] == 4 and metrics["n_dev"] == 2 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["steps"] == 4 and metrics["dev"]["dev"]["n"] == 2
    # GLUE's submission format for the unlabelled test file
    sub = read_tsv(out / "predictions" / "RTE.tsv")
    assert sub[0] == ["index", "prediction"] and [r[0] for r in sub[1:]] == ["0", "1"]
    assert all(r[1] in ("entailment", "not_entailment") for r in sub[1:])
    dev_pred = read_tsv(out / "dev_predictions.tsv")
    assert dev_pred[0] == ["index", "prediction", "label"] and [r[2] for r in dev_pred[1:]] == [
        "entailment",
        "not_entailment",
    ]
    # the checkpoint is a Hugging Face layout GPT1 whose vocabulary holds the 4 task tokens
    tok = BPETokenizer.load(out / "tokenizer.json")
    assert (
        GPT1.from_pretrained(out, fused=False).config.vocab_size
        == tok.vocab_size
        == BPETokenizer.load(pretrained / "tokenizer.json").vocab_size + 4
    )
    # re-evaluating the saved best checkpoint reproduces its metrics and predictions
    capsys.readouterr()
    assert finetune(["--eval-only", "--init", str(out)]) == 0
    again = json.loads((out / "eval" / "metrics.json").read_text())
    assert again["accuracy"] == metrics["accuracy"] and again["n_dev"] == 2
    assert (out / "eval" / "dev_predictions.tsv").read_text() == (out / "dev_predictions.tsv").read_text()
    assert "dev: accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("isa,said", [("AVX512-BF16", "bf16 autocast (auto: "), (None, "fp32 (auto: ")])
def test_header_says_the_resolved_precision_and_why(pretrained, tmp_path, capsys, monkeypatch, isa, said):
    monkeypatch.setattr(precision, "cpu_bf16_isa", lambda: isa)
    rc = finetune(
        [
            "--task",
            "rte",
            "--data-dir",
            str(GLUE / "RTE"),
            "--init",
            str(pretrained),
            "--out",
            str(tmp_path / "r"),
            "--max-steps",
            "1",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    (line,) = [x for x in out.splitlines() if x.strip().startswith("precision")]
    assert said in line and (isa or "neither AMX-BF16 nor AVX512-BF16") in line, line


@pytest.mark.parametrize(
    "task,folder,keys,submission",
    [
        ("stsb", GLUE / "STS-B", ("pearson", "spearman"), "STS-B.tsv"),
        ("mrpc", GLUE / "MRPC", ("f1", "accuracy"), "MRPC.tsv"),
        ("cola", GLUE / "CoLA", ("matthews", "accuracy"), "CoLA.tsv"),
        ("mnli", GLUE / "MNLI", ("accuracy",), "MNLI-m.tsv"),
        ("swag", FIX / "swag", ("accuracy",), "swag.tsv"),
        ("race", FIX / "race" / "RACE", ("accuracy",), None),
    ],
)
def test_each_kind_runs_and_reports_its_metrics(pretrained, tmp_path, task, folder, keys, submission):
    out = tmp_path / task
    assert (
        finetune(
            [
                "--task",
                task,
                "--data-dir",
                str(folder),
                "--init",
                str(pretrained),
                "--out",
                str(out),
                "--max-steps",
                "2",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for k in keys:
        assert isinstance(metrics[k], float), k
    if submission:
        rows = read_tsv(out / "predictions" / submission)
        assert rows[0] == ["index", "prediction"] and len(rows) >= 2
    if task == "stsb":
        assert all(0.0 <= float(r[1]) <= 5.0 for r in rows[1:])
    if task == "mnli":  # matched and mismatched dev sets, both test files
        assert set(metrics["dev"]) == {"matched", "mismatched"} and metrics["n_dev"] == 2
        assert (out / "predictions" / "MNLI-mm.tsv").is_file() and (out / "dev_predictions_mismatched.tsv").is_file()
    if task == "race":  # the test split is labelled: scored, not submitted
        assert metrics["test"]["test"]["n"] == 6


def test_random_init_ablation_takes_the_runs_architecture(pretrained, tmp_path):
    out = tmp_path / "none"
    args = [
        "--task",
        "sst2",
        "--data-dir",
        str(GLUE / "SST-2"),
        "--init",
        "none",
        "--arch",
        str(pretrained),
        "--out",
        str(out),
        "--max-steps",
        "1",
    ]
    assert finetune(args) == 0
    assert json.loads((out / "task.json").read_text())["init"].startswith("random init")
    a = GPT1.from_pretrained(out, fused=False)
    b = GPT1.from_pretrained(pretrained, fused=False)
    assert a.config.n_layer == b.config.n_layer and a.config.vocab_size == b.config.vocab_size + 4


def test_user_errors_are_one_line(pretrained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/pretrain here
    cases = [
        (["--task", "nope"], "unknown task 'nope'"),
        ([], "no pretrained run at runs/pretrain (--init): make one with `python -m engine.pretrain --fused`"),
        (["--task", "rte", "--init", str(pretrained)], "pass --data-dir"),
        (["--task", "rte", "--data-dir", str(tmp_path), "--init", str(pretrained)], "task file not found"),
        (
            ["--task", "sst2", "--data-dir", str(GLUE / "SST-2"), "--init", str(pretrained), "--lm-coef", "-1"],
            "--lm-coef",
        ),
        (["--eval-only", "--init", str(pretrained)], "--eval-only needs --init RUN_DIR of a fine-tuned run"),
    ]
    for args, message in cases:
        assert finetune(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    bad = tmp_path / "SST-2"
    bad.mkdir()
    (bad / "train.tsv").write_text("text\tlabel\nx\t1\n")
    (bad / "dev.tsv").write_text("sentence\tlabel\nx\t1\n")
    assert finetune(["--task", "sst2", "--data-dir", str(bad), "--init", str(pretrained)]) == 2
    assert "train.tsv:1: header lacks column(s) ['sentence']" in capsys.readouterr().err


def test_never_overwrites_a_finished_run(pretrained, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "--task",
        "wnli",
        "--data-dir",
        str(GLUE / "WNLI"),
        "--init",
        str(pretrained),
        "--out",
        str(out),
        "--max-steps",
        "1",
    ]
    assert finetune(args) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert finetune(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert finetune(args + ["--overwrite", "--seed", "3"]) == 0


def test_add_task_tokens_appends_fresh_rows(pretrained):
    body = GPT1.from_pretrained(pretrained, fused=False)
    tok = BPETokenizer.load(pretrained / "tokenizer.json")
    old = body.tokens_embed.weight.detach().clone()
    add_task_tokens(body, tok)
    sp = tok.special_tokens()
    W = body.tokens_embed.weight.detach()
    assert W.shape[0] == old.shape[0] + 4 == tok.vocab_size
    assert torch.equal(W[: old.shape[0]], old)
    assert (sp.start, sp.delimiter, sp.classify, sp.pad) == tuple(range(old.shape[0], old.shape[0] + 4))
    assert W[old.shape[0] :].abs().sum() > 0 and W[old.shape[0] :].std() < 0.1  # N(0, 0.02) rows


def test_batches_are_a_pure_function_of_the_step():
    items = [Encoded(((1, i, 3),), i % 2) for i in range(5)]
    fetch = ExampleBatches(items, batch_size=2, seed=0, pad_id=0)
    first = fetch(0, 0, 2)
    assert torch.equal(first["input_ids"], ExampleBatches(items, 2, 0, 0)(0, 0, 2)["input_ids"])  # a fresh copy agrees
    assert torch.equal(fetch(0, 1, 1)["input_ids"][0], first["input_ids"][1])  # a rank's slice of the same batch
    fetch1 = ExampleBatches(items, batch_size=1, seed=0, pad_id=0)
    orders = [[int(fetch1(s, 0, 1)["input_ids"][0, 0, 1]) for s in range(e * 5, e * 5 + 5)] for e in range(3)]
    assert all(sorted(o) == [0, 1, 2, 3, 4] for o in orders)  # each example once per epoch
    assert len({tuple(o) for o in orders}) > 1  # reshuffled every epoch


@pytest.mark.slow
def test_two_process_ddp_run(pretrained, tmp_path):
    """torchrun with 2 gloo processes: each rank trains on its slice, evaluates its share of
    dev, and rank 0 alone writes the run."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "engine.finetune",
        "--no-fused",
        "--quiet",
        "--task",
        "rte",
        "--data-dir",
        str(GLUE / "RTE"),
        "--init",
        str(pretrained),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[2]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_dev"] == 2 and metrics["dev"]["dev"]["n"] == 2  # both ranks' shares gathered
    assert len(read_tsv(out / "dev_predictions.tsv")) == 3


def test_fused_path_runs_the_same_cli(pretrained, tmp_path):
    from engine import ops

    if not torch.cuda.is_available() and ops.cpu_kernels_error():
        pytest.skip(ops.cpu_kernels_error())
    out = tmp_path / "fused"
    args = [
        "--fused",
        "--quiet",
        "--batch-size",
        "2",
        "--task",
        "rocstories",
        "--data-dir",
        str(FIX / "rocstories"),
        "--init",
        str(pretrained),
        "--out",
        str(out),
        "--max-steps",
        "2",
    ]
    assert run_cli(main, args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] == 5 and metrics["n_dev"] == 1 and metrics["test"]["test"]["n"] == 1


def test_stop_and_resume_matches_an_uninterrupted_run(pretrained, tmp_path):
    common = [
        "--task",
        "rte",
        "--data-dir",
        str(GLUE / "RTE"),
        "--init",
        str(pretrained),
        "--max-steps",
        "4",
        "--eval-every",
        "2",
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert finetune(common + ["--out", str(whole)]) == 0
    assert finetune(common + ["--out", str(split), "--stop-at", "2"]) == 0
    assert not (split / "metrics.json").exists() and (split / "checkpoints" / "step_00000002").is_dir()
    assert finetune(["--resume", str(split)]) == 0
    for name in ("model.safetensors", "head.safetensors", "dev_predictions.tsv"):
        assert (split / name).read_bytes() == (whole / name).read_bytes(), name
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, split))
    assert (a["accuracy"], a["best_step"], a["steps"]) == (b["accuracy"], b["best_step"], b["steps"])


def test_learns_a_separable_multiple_choice_task(pretrained, tmp_path, capsys):
    """The whole path (transform, extract position, head, loss, optimiser) can learn: Story
    Cloze rows whose right ending always closes with one word and the wrong with another."""
    import csv
    import random

    rng = random.Random(0)
    words = "the premise states a hypothesis about what people do".split()
    header = [
        "InputStoryid",
        *(f"InputSentence{i}" for i in range(1, 5)),
        "RandomFifthSentenceQuiz1",
        "RandomFifthSentenceQuiz2",
        "AnswerRightEnding",
    ]
    data = tmp_path / "story"
    data.mkdir()
    with open(data / "cloze_val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(250):
            story = [" ".join(rng.choice(words) for _ in range(3)) for _ in range(4)]
            right = " ".join(rng.choice(words) for _ in range(2)) + " yes"  # short: nothing is truncated
            wrong = " ".join(rng.choice(words) for _ in range(2)) + " no"
            answer = rng.randint(1, 2)
            w.writerow([f"s{i}", *story, *((right, wrong) if answer == 1 else (wrong, right)), answer])
    out = tmp_path / "run"
    rc = run_cli(
        main,
        [
            "--no-fused",
            "--quiet",
            "--task",
            "rocstories",
            "--data-dir",
            str(data),
            "--init",
            str(pretrained),
            "--out",
            str(out),
            "--batch-size",
            "16",
            "--lr",
            "1e-3",
            "--max-steps",
            "150",
            "--lm-coef",
            "0",
        ],
    )
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_dev"] == 50 and metrics["accuracy"] >= 0.9, metrics


@pytest.mark.parametrize(
    "device, given, lr",
    [
        ("cpu", {}, CPU_LR),
        ("cuda", {}, PAPER_TRAIN["lr"]),
        ("cpu", {"lr": 3e-5}, 3e-5),
        ("cuda", {"lr": 3e-5}, 3e-5),
    ],
)
def test_default_lr_is_the_papers_on_cuda_and_cpu_lr_on_cpu(tmp_path, device, given, lr):
    cfg = _resolve_train_config(FinetuneConfig(), given, tmp_path, 6000, torch.device(device))
    assert cfg.lr == lr
    assert cfg.batch_size == PAPER_TRAIN["batch_size"] and cfg.max_steps == 563  # 3 epochs: ceil(3 · 6000 / 32)


def test_empty_and_cut_examples_are_counted_in_a_note_and_in_metrics(pretrained, tmp_path, capsys):
    """Issue 23, item 5: an empty SST-2 sentence trained silently as an example with no text,
    and examples longer than max_len were cut silently."""
    data = tmp_path / "SST-2"
    data.mkdir()
    for name in ("dev.tsv", "test.tsv"):
        (data / name).write_text((GLUE / "SST-2" / name).read_text())
    rows = (GLUE / "SST-2" / "train.tsv").read_text().splitlines()
    long = " ".join(["a gorgeous , witty film"] * 30)
    (data / "train.tsv").write_text("\n".join([*rows, " \t1", f"{long}\t0"]) + "\n")
    out = tmp_path / "run"
    assert (
        finetune(
            ["--task", "sst2", "--data-dir", str(data), "--init", str(pretrained), "--out", str(out)]
            + ["--max-steps", "1", "--max-len", "64"]
        )
        == 0
    )
    err = capsys.readouterr().err
    n = len(rows)  # the header's line number is the last old row's: the new ones are n + 1, n + 2
    (note,) = [line for line in err.splitlines() if line.startswith("note: train:")]
    assert f"1 of {n + 1} train examples is longer than max_len 64 and was cut to it" in note
    assert f"1 of {n + 1} train examples has an empty text (train.tsv:{n + 1}): kept" in note
    inputs = json.loads((out / "metrics.json").read_text())["inputs"]
    assert inputs["train"]["truncated"] == 1 and inputs["train"]["empty"] == 1 and inputs["train"]["tokens_cut"] > 100
    assert set(inputs) == {"train", "dev", "test"} and inputs["dev"]["examples"] == 2
