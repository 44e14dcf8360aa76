"""`python -m engine.evaluate`: loss and perplexity against a direct computation, token by
token, of what the windows promise (each token once, with the context the stride gives)."""

import json
import math

import pytest
import torch

from engine import GPT1
from engine.cli import run_cli
from engine.evaluate import main, score_documents, windows
from engine.model.tokenizer import BPETokenizer
from helpers import assert_close
from inference_runs import TEXT, make_lm_run

P = 8  # a short context, so that the documents span many windows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_lm_run(tmp_path_factory.mktemp("run") / "pretrain", n_positions=P)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "a.txt").write_text(TEXT)
    (d / "b.txt").write_text("whether 'tis nobler in the mind to suffer\n")
    return [d / "a.txt", d / "b.txt"]


def cli(argv):
    try:
        return run_cli(main, argv)
    except SystemExit as e:
        return e.code


def direct_loss(model, docs, stride):
    """Target j of a document is predicted from tokens[k*stride : j], k the first window
    (k*stride + P >= j) that reaches it; the mean of -log p over every target."""
    nll = []
    with torch.no_grad():
        for ids in docs:
            for j in range(1, len(ids)):
                k = max(0, math.ceil((j - P) / stride))
                ctx = ids[k * stride : j]
                assert 1 <= len(ctx) <= P and (stride == 1 and len(ctx) == min(j, P) or stride > 1)
                logits = model(torch.tensor([ctx])).logits[0, -1].double()
                nll.append(-torch.log_softmax(logits, -1)[ids[j]])
    return torch.stack(nll).mean(), len(nll)


def load(run, fused=False):
    return GPT1.from_pretrained(run, fused=fused).eval(), BPETokenizer.load(run / "tokenizer.json")


@pytest.mark.parametrize("n_tokens", [1, 2, 7, 8, 9, 10, 31])
@pytest.mark.parametrize("stride", [1, 3, 8])
def test_windows_score_each_target_once_within_the_context(n_tokens, stride):
    ws = windows(0, n_tokens, P, stride)
    targets = [j for w in ws for j in range(w.first, w.end + 1)]
    assert targets == list(range(1, n_tokens)), "every token but the first, once, in order"
    assert all(w.end - w.begin <= P and w.begin < w.first for w in ws)


@pytest.mark.parametrize("stride", [1, 3, 8])
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_loss_equals_the_direct_computation(run, files, stride, fused):
    model, tok = load(run, fused)
    docs = [tok.encode(f.read_text()) for f in files]
    assert len(docs[0]) > 3 * P
    expected, n = direct_loss(load(run)[0], docs, stride)
    score = score_documents(model, docs, stride, batch_size=3)
    assert score.tokens == n == sum(len(d) - 1 for d in docs)
    assert_close(torch.tensor(score.loss, dtype=torch.float32), expected.float(), "loss")  # fp32 model: FP32_TOL


def test_cli_json_and_text(run, files, capsys):
    assert cli([str(run), "--data", *map(str, files), "--no-fused", "--device", "cpu", "--stride", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model, tok = load(run)
    expected, n = direct_loss(model, [tok.encode(f.read_text()) for f in files], 3)
    assert set(got) == {"loss", "perplexity", "tokens"} and got["tokens"] == n
    assert abs(got["loss"] - expected.item()) <= 1e-5 * max(1.0, expected.item())
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    assert cli([str(run), "--data", str(files[0].parent), "--no-fused", "--device", "cpu"]) == 0  # a directory expands
    out = capsys.readouterr().out
    assert out.startswith("loss ") and "nats/token, perplexity" in out and f"over {n:,} tokens" in out


def test_text_is_scored_as_the_tokenizer_encodes_it(run, tmp_path, capsys):
    """No special tokens, no stripping: a Gutenberg-looking header is text like any other."""
    f = tmp_path / "g.txt"
    f.write_text("*** START OF THE PROJECT GUTENBERG EBOOK ***\nto be, or not to be\n")
    assert cli([str(run), "--data", str(f), "--no-fused", "--device", "cpu", "--json"]) == 0
    _, tok = load(run)
    assert json.loads(capsys.readouterr().out)["tokens"] == len(tok.encode(f.read_text())) - 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stride", "0"], "--stride must be in [1, 8]"),
        (["--stride", "9"], "--stride must be in [1, 8]"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--stride", "x"], "--stride: invalid int value"),
    ],
)
def test_bad_values_are_one_line_exit_2(run, files, capsys, args, message):
    assert cli([str(run), "--data", str(files[0]), "--no-fused", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_bad_data_is_one_line_exit_2(run, tmp_path, capsys):
    base = [str(run), "--no-fused", "--device", "cpu", "--data"]
    assert cli([*base, str(tmp_path / "missing.txt")]) == 2
    assert "data path not found" in capsys.readouterr().err
    (tmp_path / "one.txt").write_text("to")
    assert cli([*base, str(tmp_path / "one.txt")]) == 2
    assert "no tokens to score" in capsys.readouterr().err
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    assert cli([*base, str(tmp_path / "bin.txt")]) == 2
    assert "looks binary" in capsys.readouterr().err
    assert cli([str(tmp_path), "--data", str(tmp_path / "one.txt")]) == 2
    assert "has no config.json" in capsys.readouterr().err
