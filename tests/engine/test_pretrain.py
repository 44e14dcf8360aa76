"""`python -m engine.pretrain`: end to end on a small corpus (CPU, tiny preset), exact resume
through the CLI, SIGTERM, the overwrite policy, DDP with 2 gloo processes, and bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine.training.precision as precision
from engine import GPT1
from engine.cli import run_cli
from engine.data.corpus import shakespeare_dir
from engine.model.tokenizer import BPETokenizer
from engine.pretrain import CPU_DEFAULTS, Pretraining, main
from engine.training.launch import RunArgs
from helpers import assert_close

ROOT = Path(__file__).resolve().parents[2]
POEMS = ["lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt", "phoenix_and_the_turtle_gut.txt"]  # ~25 kB


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # tokenizer and shards shared by the tests here


def args(out, cache, *extra):
    return [
        "--data",
        *[str(shakespeare_dir() / p) for p in POEMS],
        "--preset",
        "gpt1-tiny",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "6",
        "--vocab-size",
        "300",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "3",
        "--eval-windows",
        "4",
        "--final-eval-windows",
        "8",
        "--sample-tokens",
        "5",
        "--log-every",
        "1",
        "--no-fused",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        *extra,
    ]


def run(argv, capsys):
    code = run_cli(main, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tensors(run_dir):
    return load_file(str(Path(run_dir) / "model.safetensors"))


def test_help_lists_the_contract_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--data",
        "--tokenizer",
        "--preset",
        "--out",
        "--max-steps",
        "--batch-size",
        "--seq-len",
        "--lr",
        "--seed",
        "--eval-every",
        "--checkpoint-every",
        "--resume",
        "--overwrite",
        "--device",
        "--fused",
        "--no-fused",
        "--compile",
        "--text-field",
        "--warmup-steps",
        "--micro-batch-size",
    ):
        assert flag in text, flag


def test_default_run_is_sized_for_the_cpu():
    recipe = Pretraining.resolve({}, {}, RunArgs())
    pcfg, tcfg = recipe.config, recipe.train
    if torch.cuda.is_available():
        assert pcfg.preset == "gpt1" and tcfg.batch_size == 64 and pcfg.seq_len == 512 and tcfg.lr == 2.5e-4
        return
    assert pcfg.preset == CPU_DEFAULTS.preset and pcfg.data is None and tcfg.fused
    assert tcfg.max_steps == CPU_DEFAULTS.max_steps and tcfg.warmup_steps == tcfg.max_steps // 10
    assert pcfg.vocab_size == CPU_DEFAULTS.vocab_size and tcfg.lr == CPU_DEFAULTS.lr
    assert (tcfg.beta1, tcfg.beta2, tcfg.eps) == (0.9, 0.999, 1e-8)
    assert tcfg.weight_decay == 0.01 and tcfg.grad_clip == 1.0 and tcfg.schedule == "cosine"


@pytest.mark.parametrize("path", ["--fused", "--no-fused"])
def test_smoke_end_to_end(path, tmp_path, cache, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(args(out, cache, path), capsys)
    assert code == 0, err
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "loss.png",
        "train_config.json",
        "samples.txt",
    ):
        assert (out / name).is_file(), name
    model = GPT1.from_pretrained(out, fused=False)
    assert model.config.n_layer == 2 and model.config.vocab_size == BPETokenizer.load(out / "tokenizer.json").vocab_size
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7)) and all(r["tokens_per_s"] > 0 for r in train)
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert [r["step"] for r in records if "final_val_loss" in r] == [6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["train"]["max_steps"] == 6 and saved["pretrain"]["preset"] == "gpt1-tiny"
    assert "GPT-1 pretraining" in stdout and "unigram entropy" in stdout and str(out) in stdout
    assert ("fused kernels" in stdout) == (path == "--fused") and saved["train"]["fused"] == (path == "--fused")
    assert "Traceback" not in err


def test_resume_through_the_cli_is_bit_identical(tmp_path, cache, capsys):
    """On the fused path (the default): its dropout seeds come from torch's RNG, restored."""
    assert run(args(tmp_path / "full", cache, "--fused"), capsys)[0] == 0
    code, stdout, _ = run(args(tmp_path / "part", cache, "--fused", "--stop-at", "4"), capsys)
    assert code == 0 and "stopped at update 4" in stdout
    assert sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
    code, stdout, err = run(["--resume", str(tmp_path / "part")], capsys)
    assert code == 0, err
    assert "resuming" in stdout
    full, resumed = tensors(tmp_path / "full"), tensors(tmp_path / "part")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # Settings that would make a different run cannot change on resume.
    code, _, err = run(["--resume", str(tmp_path / "part"), "--lr", "1e-3"], capsys)
    assert code == 2 and "--resume cannot change --lr" in err


def test_refuses_to_overwrite_a_run(tmp_path, cache, capsys):
    out = tmp_path / "run"
    assert run(args(out, cache, "--max-steps", "2"), capsys)[0] == 0
    before = (out / "model.safetensors").read_bytes()
    code, _, err = run(args(out, cache, "--max-steps", "2", "--seed", "1"), capsys)
    assert code == 2 and err.count("\n") == 1 and "already holds a run" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == before
    code, _, err = run(args(out, cache, "--max-steps", "2", "--seed", "1", "--overwrite"), capsys)
    assert code == 0, err
    assert (out / "model.safetensors").read_bytes() != before


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


BAD_INPUTS = {
    "missing file": (lambda d: ["--data", str(d / "nope.txt")], "data path not found"),
    "empty corpus": (lambda d: ["--data", write(d / "empty.txt", "\n\n")], "corpus is empty"),
    "binary file": (lambda d: ["--data", write(d / "x.txt", b"\x7fELF\x00\x00\x01")], "looks binary"),
    "non-utf8 file": (lambda d: ["--data", write(d / "x.txt", "na\u00efve\n\nmore".encode("latin-1"))], "not UTF-8"),
    "shorter than a window": (
        lambda d: ["--data", write(d / "x.txt", "a few words.\n\nand a few more.")],
        "shorter than one window",
    ),
    "bad jsonl field": (lambda d: ["--data", write(d / "x.jsonl", '{"body": "hi"}\n')], "no 'text' field"),
    "unknown preset": (lambda d: ["--preset", "gpt9"], "unknown --preset 'gpt9'"),
    "negative lr": (lambda d: ["--lr", "-1"], "--lr must be a positive"),
    "batch 0": (lambda d: ["--batch-size", "0"], "--batch-size must be positive"),
    "not a number": (lambda d: ["--max-steps", "many"], "invalid int value: 'many'"),
    "seq-len over n_positions": (
        lambda d: ["--preset", "gpt1-tiny", "--seq-len", "65"],
        "exceeds the gpt1-tiny preset's n_positions",
    ),
    "cuda without a gpu": (lambda d: ["--device", "cuda"], "no CUDA GPU"),
    "resume without a run": (lambda d: ["--resume", str(d / "out")], "no train_config.json"),
    "micro batch not dividing": (
        lambda d: ["--batch-size", "4", "--micro-batch-size", "3"],
        "must divide the per-process batch",
    ),
    "missing tokenizer": (lambda d: ["--tokenizer", str(d / "tok.json")], "--tokenizer path not found"),
    "bad choice": (lambda d: ["--schedule", "step"], "invalid choice: 'step'"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(name, tmp_path, cache, capsys):
    if name == "cuda without a gpu" and torch.cuda.is_available():
        pytest.skip("there is a GPU")
    make, message = BAD_INPUTS[name]
    out = tmp_path / "out"
    base = [
        "--preset",
        "gpt1-tiny",
        "--seq-len",
        "32",
        "--max-steps",
        "2",
        "--vocab-size",
        "300",
        "--no-fused",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--data",
        *[str(shakespeare_dir() / p) for p in POEMS],
    ]
    try:
        code, _, err = run(base + make(tmp_path), capsys)
    except SystemExit as e:  # argparse errors exit straight from parse_args
        code, err = e.code, capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
    assert not out.exists()


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cache, capsys):
    # The shards and tokenizer are cached first, so the child starts training at once.
    assert run(args(tmp_path / "warm", cache, "--max-steps", "1"), capsys)[0] == 0
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "engine.pretrain",
        *args(out, cache, "--max-steps", "100000", "--eval-every", "0", "--checkpoint-every", "0"),
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        metrics = out / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted by signal 15" in stderr and "Traceback" not in stderr
    (ckpt,) = (out / "checkpoints").iterdir()
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert ckpt.name == f"step_{step:08d}" and step >= 2
    assert (out / "model.safetensors").is_file()
    assert torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"] == step


def ddp_run(out, cache, *extra):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "engine.pretrain",
        *args(out, cache, *extra),
    ]
    proc = subprocess.run(cmd, cwd=out.parent, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("GPT-1 pretraining") == 1  # rank 0 alone prints
    return proc


DDP_COMMON = [
    "--dropout",
    "0",
    "--max-steps",
    "3",
    "--eval-every",
    "0",
    "--checkpoint-every",
    "0",
    "--sample-tokens",
    "0",
]


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path, cache, capsys):
    """2 processes x 2 sequences = 1 process x 4 sequences: each rank reads its own half of
    the same global batch, gradients are averaged, so the weights agree to fp32 rounding."""
    common = [*DDP_COMMON, "--precision", "fp32"]
    assert run(args(tmp_path / "one", cache, *common), capsys)[0] == 0
    ddp_run(tmp_path / "two", cache, *common)
    one, two = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    for k in one:
        assert_close(two[k], one[k], k)
    losses = [
        [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        for d in ("one", "two")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.slow
def test_ddp_under_bf16_autocast_matches_accumulation(tmp_path, cache):
    """Under bf16 autocast (on every CPU: emulated where bf16 is not native), 2 processes x 2
    sequences compute what 1 process accumulating 2 micro-batches of 2 does: the same bf16
    forwards, the halved gradients summed. Both in subprocesses with one thread each, so that
    the bf16 GEMMs block alike."""
    common = [*DDP_COMMON, "--precision", "bf16"]
    proc = subprocess.run(
        [sys.executable, "-m", "engine.pretrain", *args(tmp_path / "one", cache, *common, "--micro-batch-size", "2")],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bf16 autocast (asked for" in proc.stdout
    assert "bf16 autocast (asked for" in ddp_run(tmp_path / "two", cache, *common).stdout
    one, two = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    for k in one:
        assert_close(two[k], one[k], k)


@pytest.mark.parametrize("isa,said", [("AMX-BF16", "bf16 autocast (auto: "), (None, "fp32 (auto: ")])
def test_header_says_the_resolved_precision_and_why(isa, said, tmp_path, cache, capsys, monkeypatch):
    """The config says "auto"; the header says what auto became on this machine, and why."""
    monkeypatch.setattr(precision, "cpu_bf16_isa", lambda: isa)
    code, stdout, err = run(args(tmp_path / "run", cache, "--max-steps", "1", "--sample-tokens", "0"), capsys)
    assert code == 0, err
    (line,) = [x for x in stdout.splitlines() if x.strip().startswith("precision")]
    assert said in line and (isa or "neither AMX-BF16 nor AVX512-BF16") in line, line


def test_tokenizer_paths(tmp_path):
    from engine.model.tokenizer import load_tokenizer

    tok = BPETokenizer.train(texts=["to be or not to be"] * 5, vocab_size=40)
    tok.save(tmp_path / "run" / "tokenizer.json")
    for spec in ([str(tmp_path / "run" / "tokenizer.json")], [str(tmp_path / "run")]):
        assert load_tokenizer(spec).encode("to be") == tok.encode("to be")
    # GPT-1's original two files (a toy vocabulary in their format), as two paths or their directory.
    gpt1 = tmp_path / "gpt1"
    vocab = {"<unk>": 0, "t": 1, "o": 2, "o</w>": 3, "t</w>": 4, "to</w>": 5}
    write(gpt1 / "encoder_bpe_40000.json", json.dumps(vocab))
    write(gpt1 / "vocab_40000.bpe", "#version: 0.2\nt o</w>\n")
    for spec in ([str(gpt1 / "vocab_40000.bpe"), str(gpt1 / "encoder_bpe_40000.json")], [str(gpt1)]):
        assert load_tokenizer(spec).encode("to") == [5]
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or encoder_bpe"):
        load_tokenizer([str(tmp_path)])


def test_explicit_validation_files(tmp_path):
    from engine.data.prepare import Corpus as _Corpus
    from engine.pretrain import PretrainConfig

    train = write(tmp_path / "train.txt", "one paragraph.\n\nanother one.")
    val = write(tmp_path / "val.txt", "held out text.")
    docs_train, docs_val = _Corpus(PretrainConfig(data=[train], val_data=[val])).documents()
    assert [d.text for d in docs_train] == ["one paragraph.\n\nanother one.\n"]
    assert [d.text for d in docs_val] == ["held out text.\n"]
    with pytest.raises(Exception, match="in both --data and --val-data"):
        _Corpus(PretrainConfig(data=[train], val_data=[train]))
    with pytest.raises(Exception, match="--val-data needs --data"):
        _Corpus(PretrainConfig(val_data=[val]))


def test_epochs_set_the_length_and_resume_mid_epoch_is_bit_identical(tmp_path, cache, capsys):
    """--epochs 0.5: every window at most once, max_steps from the split's window count; a run
    stopped mid-epoch and resumed equals the uninterrupted one."""
    base = [a for a in args(tmp_path / "x", cache) if a not in ("--max-steps", "6")]

    def epoch(out, *extra):
        return [*[a if a != str(tmp_path / "x") else str(out) for a in base], "--epochs", "0.5", *extra]

    code, stdout, _ = run(epoch(tmp_path / "full"), capsys)
    assert code == 0
    saved = json.loads((tmp_path / "full" / "train_config.json").read_text())
    from engine.data.windows import eval_starts

    n_train = int(re.search(r"tokens\s+train ([\d,]+)", stdout).group(1).replace(",", ""))
    expected = -(-len(eval_starts(n_train, 33)) // 2 // 4)  # ceil(0.5 · windows / batch 4)
    assert saved["train"]["max_steps"] == max(1, expected) and saved["pretrain"]["epochs"] == 0.5
    stop = max(1, expected // 2)
    assert run(epoch(tmp_path / "part", "--stop-at", str(stop)), capsys)[0] == 0
    assert run(["--resume", str(tmp_path / "part")], capsys)[0] == 0
    full, resumed = tensors(tmp_path / "full"), tensors(tmp_path / "part")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    code, _, err = run([*epoch(tmp_path / "both"), "--max-steps", "3"], capsys)
    assert code == 2 and "--epochs and --max-steps" in err


def test_tokenizer_mode_openai_needs_gpt1_files(tmp_path, cache, capsys):
    code, _, err = run(args(tmp_path / "r", cache, "--tokenizer-mode", "openai"), capsys)
    assert code == 2 and "--tokenizer-mode openai" in err and err.count("\n") == 1
