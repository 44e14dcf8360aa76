"""The zero-shot heuristics (engine.zeroshot) on a tiny model: scores against a direct
computation, each task's heuristic, the DPRD reader, and the CLI with --checkpoints."""

import json
import math
from pathlib import Path

import pytest
import torch

from engine import GPT1, zeroshot
from engine.cli import run_cli
from engine.data.records import Example, TaskDataError
from engine.data.winograd import read_winograd
from engine.model.tokenizer import BPETokenizer
from inference_runs import make_fixture_run

FIX = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_fixture_run(tmp_path_factory.mktemp("pretrained"), n_positions=64, vocab_size=300)


def load(run):
    return GPT1.from_pretrained(run, fused=False).eval(), BPETokenizer.load(run / "tokenizer.json")


def direct_average(model, context, cont):
    """log p(cont | context) per token, from the full logits."""
    ids = torch.tensor([context + cont])
    logp = model(ids, return_logits=True).logits[0].log_softmax(-1)
    return sum(logp[len(context) - 1 + j, t].item() for j, t in enumerate(cont)) / len(cont)


def test_average_logprobs_matches_the_full_softmax(run):
    model, _ = load(run)
    pairs = [([5, 6, 7], [8, 9]), ([11], [12, 13, 14, 15]), (list(range(1, 70)), [3])]  # the last overflows n_positions
    got = zeroshot.average_logprobs(model, pairs, batch_size=2)
    for (c, a), g in zip(pairs, got):
        c, a = zeroshot._fit(c, a, model.config.n_positions)
        assert math.isclose(g, direct_average(model, c, a), rel_tol=1e-5, abs_tol=1e-5)
    assert zeroshot.average_logprobs(model, [([1], [])]) == [-math.inf]


def test_multiple_choice_uses_the_average_not_the_sum(run):
    model, tok = load(run)
    ex = [Example("a", ("to be or not to be",), ("that is", "that is the question whether tis nobler"), 0)]
    scores = zeroshot.choice_scores(model, tok, ["to be or not to be"], [ex[0].choices])[0]
    ctx = tok.encode("to be or not to be")
    expected = [direct_average(model, ctx, tok.encode(" " + c)) for c in ex[0].choices]
    assert scores == pytest.approx(expected, rel=1e-5)
    r = zeroshot.multiple_choice(model, tok, "x", ex)
    assert r.value == float(expected.index(max(expected)) == 0) and r.chance == 0.5


def test_sentiment_appends_very_and_compares_the_two_words(run):
    model, tok = load(run)
    r = zeroshot.evaluate(model, tok, "sst2", FIX / "glue" / "SST-2")
    dev = zeroshot.load_examples("sst2", FIX / "glue" / "SST-2", "dev", None)[0]
    pred = []
    for e in dev:
        ctx = tok.encode(e.segments[0] + " very")
        s = [direct_average(model, ctx, tok.encode(" " + w)) for w in ("negative", "positive")]
        pred.append(int(s[1] > s[0]))
    assert r.value == pytest.approx(sum(p == e.label for p, e in zip(pred, dev)) / len(dev))


def test_cola_threshold_maximises_matthews_on_train(run):
    assert zeroshot.best_threshold([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == pytest.approx(0.5)
    model, tok = load(run)
    r = zeroshot.evaluate(model, tok, "cola", FIX / "glue" / "CoLA")
    assert r.metric == "matthews" and -1.0 <= r.value <= 1.0 and "training file" in r.heuristic


def test_dprd_reader_and_substitution(tmp_path, run):
    f = tmp_path / "test.c.txt"
    f.write_text(
        "The bee landed on the flower because it had pollen.\nit\nThe bee,the flower\nthe flower\n\n"
        "Tom thanked Bill because he had helped him.\nhe\nTom,Bill\nBill\n",
        encoding="utf-8",
    )
    ex = read_winograd(f)
    assert [e.label for e in ex] == [1, 1]
    assert ex[0].segments == ("The bee landed on the flower because ", " had pollen.")
    model, tok = load(run)
    r = zeroshot.evaluate(model, tok, "dprd", tmp_path)
    e = ex[0]
    s = [direct_average(model, tok.encode(e.segments[0] + c), tok.encode(e.segments[1])) for c in e.choices]
    assert r.n == 2 and zeroshot.winograd(model, tok, "dprd", ex[:1]).value == float(s.index(max(s)) == 1)
    bad = tmp_path / "bad.c.txt"
    bad.write_text("A sentence.\nit\nA,B\nA\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match="bad.c.txt:1.*pronoun"):
        read_winograd(bad)


def test_cli_checkpoints_curve(run, tmp_path, capsys):
    import shutil

    for step in (10, 20):
        shutil.copytree(
            run,
            run / "checkpoints" / f"step_{step:08d}",
            ignore=shutil.ignore_patterns("checkpoints"),
            dirs_exist_ok=True,
        )
    out = tmp_path / "curve"
    code = run_cli(
        zeroshot.main,
        [
            str(run),
            "--task",
            "shakespeare-cloze",
            "shakespeare-order",
            "--max-examples",
            "6",
            "--checkpoints",
            "--out",
            str(out),
            "--no-fused",
            "--json",
        ],
    )
    assert code == 0
    curve = json.loads((out / "zeroshot.json").read_text())
    assert [r["step"] for r in curve] == [10, 20] and curve[0]["shakespeare-cloze"]["n"] == 6
    assert curve[0]["shakespeare-order"] == curve[1]["shakespeare-order"]  # the same weights, the same score
    assert (out / "zeroshot.png").stat().st_size > 0
    assert json.loads(capsys.readouterr().out) == curve


def test_cli_user_errors(run, capsys):
    assert run_cli(zeroshot.main, [str(run), "--task", "mnli"]) == 2
    assert "unknown zero-shot task 'mnli'" in capsys.readouterr().err
    assert run_cli(zeroshot.main, [str(run), "--task", "sst2"]) == 2
    assert "--data-dir" in capsys.readouterr().err
