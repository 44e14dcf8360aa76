"""`python -m engine.generate`: the run's model and tokenizer, streamed output that equals
GPT1.generate's tokens decoded, greedy at temperature 0, one-line errors for bad values."""

import pytest
import torch

from engine import GPT1
from engine.cli import run_cli
from engine.generate import Sampler, main
from engine.model.tokenizer import BPETokenizer
from inference_runs import make_lm_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_lm_run(tmp_path_factory.mktemp("run") / "pretrain")


def cli(argv):
    """The exit code, as the shell sees it (argparse exits on its own errors)."""
    try:
        return run_cli(main, argv)
    except SystemExit as e:
        return e.code


def generate(run, *args):
    return cli([str(run), "--no-fused", "--device", "cpu", *args])


def direct(run, prompt, n, samples=1, temperature=0.8, top_k=40, seed=0):
    """What the CLI should print: GPT1.generate on the same seed, decoded, one sample after another."""
    model = GPT1.from_pretrained(run, fused=False).eval()
    tok = BPETokenizer.load(run / "tokenizer.json")
    ids = torch.tensor([tok.encode(prompt)])
    g = torch.Generator().manual_seed(seed)
    texts = [
        tok.decode(model.generate(ids, n, temperature=temperature, top_k=top_k, generator=g)[0].tolist())
        for _ in range(samples)
    ]
    return "---\n".join(t + "\n" for t in texts)


def test_samples_are_generate_decoded_and_reproducible(run, capsys):
    assert generate(run, "--prompt", "to be, or", "--max-new-tokens", "12", "--num-samples", "2", "--seed", "5") == 0
    out = capsys.readouterr().out
    assert out == direct(run, "to be, or", 12, samples=2, seed=5)
    first, second = out.split("---\n")
    assert first != second, "the second sample continues the generator: a different draw"
    assert generate(run, "--prompt", "to be, or", "--max-new-tokens", "12", "--num-samples", "2", "--seed", "5") == 0
    assert capsys.readouterr().out == out


def test_temperature_zero_is_greedy(run, capsys):
    assert generate(run, "--prompt", "the slings", "--max-new-tokens", "9", "--temperature", "0", "--seed", "1") == 0
    greedy = capsys.readouterr().out
    assert greedy == direct(run, "the slings", 9, temperature=0)
    assert generate(run, "--prompt", "the slings", "--max-new-tokens", "9", "--temperature", "0", "--seed", "2") == 0
    assert capsys.readouterr().out == greedy, "greedy decoding does not depend on the seed"


def test_default_length_fits_the_context(run, capsys):
    assert generate(run, "--prompt", "to be") == 0  # n_positions 64: fewer than the default 100 tokens fit
    model = GPT1.from_pretrained(run, fused=False)
    tok = BPETokenizer.load(run / "tokenizer.json")
    n_prompt = len(tok.encode("to be"))
    assert capsys.readouterr().out == direct(run, "to be", model.config.n_positions - n_prompt)


def test_tokens_are_written_as_they_come(run):
    model = GPT1.from_pretrained(run, fused=False).eval()
    tok = BPETokenizer.load(run / "tokenizer.json")
    pieces = []
    ids = Sampler(model, tok).stream(tok.encode("to die"), 10, torch.Generator().manual_seed(0), pieces.append)
    assert len(ids) == len(tok.encode("to die")) + 10
    assert "".join(pieces) == tok.decode(ids) + "\n"
    assert len([p for p in pieces if p]) > 5, "the text must arrive piece by piece, not at the end"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "nan"], "--temperature must be a finite number"),
        (["--temperature", "inf"], "--temperature must be a finite number"),
        (["--temperature", "-1"], "--temperature must be a finite number"),
        (["--top-k", "0"], "--top-k must be a positive integer"),
        (["--top-k", "x"], "--top-k: invalid int value"),
        (["--num-samples", "0"], "--num-samples must be at least 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--max-new-tokens", "500"], "leaves room for at most"),
        (["--seed", "1.5"], "--seed: invalid int value"),
    ],
)
def test_bad_values_are_one_line_exit_2(run, capsys, args, message):
    assert generate(run, "--prompt", "to be", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_bad_runs_and_prompts_are_one_line_exit_2(run, tmp_path, capsys):
    assert generate(tmp_path / "nope", "--prompt", "to be") == 2
    assert "is not a directory" in capsys.readouterr().err
    assert generate(tmp_path, "--prompt", "to be") == 2
    assert "has no config.json" in capsys.readouterr().err
    assert generate(run, "--prompt", "") == 2
    assert "encodes to no tokens" in capsys.readouterr().err
    assert generate(run, "--prompt", "to be " * 40) == 2
    assert "shorten it" in capsys.readouterr().err
    assert generate(run) == 2
    assert "--prompt" in capsys.readouterr().err


def test_fused_path_gives_the_greedy_tokens_of_the_reference(run, capsys):
    assert (
        cli([str(run), "--device", "cpu", "--prompt", "the slings", "--max-new-tokens", "9", "--temperature", "0"]) == 0
    )
    assert capsys.readouterr().out == direct(run, "the slings", 9, temperature=0)


def test_run_defaults_to_the_pretraining_run(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["--prompt", "to be", "--no-fused"]) == 2
    assert "no run at runs/pretrain: make one with `python -m engine.pretrain --fused`" in capsys.readouterr().err
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "pretrain").symlink_to(run)
    assert cli(["--prompt", "to be", "--max-new-tokens", "3", "--no-fused", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == direct(run, "to be", 3)
