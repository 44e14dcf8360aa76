"""`python -m engine.predict` and engine.predict.Predictor: a fine-tuned run applied to new
examples, checked against the body + head computed directly and against transformers'
classes loading the exported run."""

import json
from pathlib import Path

import pytest
import torch

from engine.cli import run_cli
from engine.data.transforms import InputTransform
from engine.predict import Predictor, main
from helpers import assert_close
from inference_runs import EXAMPLES, TASKS, make_lm_run, make_task_run

transformers = pytest.importorskip("transformers")
GLUE = Path(__file__).resolve().parents[1] / "fixtures" / "glue"
KINDS = list(TASKS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {kind: make_task_run(root / kind, kind) for kind in KINDS}


def cli(argv):
    try:
        return run_cli(main, argv)
    except SystemExit as e:
        return e.code


def direct_outputs(predictor, examples):
    """The head on the extract tokens' final states, one example at a time (no batching, no
    padding): logits, choice scores, or the score in the data's units."""
    head, body = predictor.model.head, predictor.model.body
    enc = InputTransform(predictor.tokenizer, predictor.kind, predictor.max_len)(predictor.examples(examples))
    outs = []
    with torch.no_grad():
        for e in enc:
            h = torch.stack([body(torch.tensor([s])).hidden_states[0, -1] for s in e.sequences])  # (S, C)
            if predictor.kind in ("similarity", "regression"):
                h = h.sum(0, keepdim=True)
            out = head.linear(h)  # (S', n_out)
            if predictor.kind == "multiple_choice":
                outs.append(out[:, 0])
            elif predictor.kind == "regression":
                outs.append(out[0, 0] * head.target_std + head.target_mean)
            else:
                outs.append(out[0])
    return outs


@pytest.mark.parametrize("kind", KINDS)
def test_predictions_equal_the_head_computed_directly(runs, kind):
    predictor = Predictor.from_run(runs[kind], device="cpu", fused=False)
    examples = EXAMPLES[kind]
    results = predictor.predict(examples, batch_size=2)
    expected = direct_outputs(predictor, examples)
    assert [r["id"] for r in results] == [str(e.get("id", i)) for i, e in enumerate(examples)]
    for r, out in zip(results, expected):
        if kind == "regression":
            assert_close(torch.tensor(r["prediction"]), out, "score")
            continue
        p = out.softmax(-1)
        k = int(p.argmax())
        if kind == "multiple_choice":
            assert r["prediction"] == k and len(r["probabilities"]) == len(p)
            assert_close(torch.tensor(r["probabilities"]), p, "probabilities")
        else:
            assert r["prediction"] == predictor.labels[k]
            assert_close(torch.tensor([r["probabilities"][lab] for lab in predictor.labels]), p, "probabilities")


def hf_outputs(model_dir, name, batch, kind):
    """What the exported model gives, read as engine.model.hf documents for each kind."""
    cls = getattr(transformers, name)
    model = cls.from_pretrained(model_dir).eval()
    with torch.no_grad():
        if name == "OpenAIGPTDoubleHeadsModel":
            return model(input_ids=batch.input_ids, mc_token_ids=batch.extract).mc_logits  # (B, S)
        B, S, T = batch.input_ids.shape
        logits = model(input_ids=batch.input_ids.reshape(B * S, T)).logits.view(B, S, -1)
    out = logits.sum(1)  # similarity, regression: the 2 orders added; otherwise S = 1
    return out[:, 0] if kind == "regression" else out


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_loads_the_export_with_the_same_predictions(runs, tmp_path, kind):
    predictor = Predictor.from_run(runs[kind], device="cpu", fused=False)
    examples = EXAMPLES[kind][:1] if kind == "multiple_choice" else EXAMPLES[kind]  # one choice count per batch
    name = predictor.export_hf(tmp_path / "hf")
    assert name == ("OpenAIGPTDoubleHeadsModel" if kind == "multiple_choice" else "OpenAIGPTForSequenceClassification")
    got = hf_outputs(tmp_path / "hf", name, predictor.batch(examples), kind)
    ours = torch.stack(predictor.scores(predictor.encode(examples)))
    if kind == "regression":
        ours = torch.tensor([r["prediction"] for r in predictor.predict(examples)])
    assert_close(got, ours, f"{name} outputs")
    if kind != "regression":
        assert got.argmax(-1).tolist() == ours.argmax(-1).tolist()
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == [name] and cfg["pad_token_id"] == predictor.tokenizer.special_tokens().pad
    if predictor.labels:
        assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").id2label == dict(enumerate(predictor.labels))


def test_cli_jsonl_in_jsonl_out(runs, tmp_path, capsys):
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES["entailment"]))
    assert cli([str(runs["entailment"]), "--input", str(f), "--no-fused", "--device", "cpu"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    expected = Predictor.from_run(runs["entailment"], device="cpu", fused=False).predict(EXAMPLES["entailment"])
    assert [r["id"] for r in lines] == ["in.jsonl:1", "in.jsonl:2"]
    assert [r["prediction"] for r in lines] == [r["prediction"] for r in expected]
    out = tmp_path / "preds.jsonl"
    assert cli([str(runs["entailment"]), "--input", str(f), "--output", str(out), "--no-fused", "--device", "cpu"]) == 0
    assert [json.loads(x)["prediction"] for x in out.read_text().splitlines()] == [r["prediction"] for r in expected]


def test_cli_reads_the_glue_test_layout_of_a_finetuned_run(tmp_path, capsys):
    """A run as the fine-tuning CLI writes it, applied to GLUE's unlabelled test file."""
    from engine.finetune import main as finetune

    pre = make_lm_run(tmp_path / "pre", n_positions=64)
    out = tmp_path / "rte"
    args = [
        "--no-fused",
        "--quiet",
        "--batch-size",
        "2",
        "--task",
        "rte",
        "--data-dir",
        str(GLUE / "RTE"),
        "--init",
        str(pre),
        "--out",
        str(out),
        "--max-steps",
        "2",
    ]
    assert run_cli(finetune, args) == 0
    capsys.readouterr()
    assert cli([str(out), "--input", str(GLUE / "RTE" / "test.tsv"), "--no-fused", "--device", "cpu"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == ["0", "1"]  # GLUE's index column
    assert all(r["prediction"] in ("entailment", "not_entailment") for r in rows)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "to be"}'], "in.jsonl:1: entailment examples have the fields ['text', 'text_pair']"),
        (['{"text": "a", "text_pair": "b", "hypothesis": "c"}'], "unknown ['hypothesis']"),
        (['{"text": "a", "text_pair": 3}'], "must be strings"),
        (['{"text": "a", "text_pair": "b"}', "[1, 2]"], "in.jsonl:2"),
        ([""], "holds no examples"),
    ],
)
def test_bad_input_is_one_line_exit_2(runs, tmp_path, capsys, lines, message):
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(lines) + "\n")
    assert cli([str(runs["entailment"]), "--input", str(f), "--no-fused", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_bad_runs_are_one_line_exit_2(runs, tmp_path, capsys):
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps(EXAMPLES["classification"][0]) + "\n")
    pre = make_lm_run(tmp_path / "pre")
    assert cli([str(pre), "--input", str(f), "--no-fused"]) == 2
    assert "has no task.json: not a fine-tuned run" in capsys.readouterr().err
    assert cli([str(runs["multiple_choice"]), "--input", str(GLUE / "RTE" / "test.tsv"), "--no-fused"]) == 2
    assert "is not a GLUE task; give JSONL" in capsys.readouterr().err
    assert cli([str(runs["classification"]), "--no-fused"]) == 2
    assert "nothing to do" in capsys.readouterr().err
    bad = tmp_path / "bad"
    make_task_run(bad, "classification")
    (bad / "head.safetensors").write_bytes(b"garbage")
    assert cli([str(bad), "--input", str(f), "--no-fused", "--device", "cpu"]) == 2
    assert "head.safetensors is not a readable safetensors file" in capsys.readouterr().err
    (bad / "task.json").write_text(json.dumps({"task": "sst2", "kind": "ranking", "labels": [], "max_len": 40}))
    assert cli([str(bad), "--input", str(f), "--no-fused", "--device", "cpu"]) == 2
    assert "task.json: field 'kind' must be one of" in capsys.readouterr().err


def test_export_from_the_cli(runs, tmp_path, capsys):
    assert (
        cli([str(runs["multiple_choice"]), "--export-hf", str(tmp_path / "hf"), "--no-fused", "--device", "cpu"]) == 0
    )
    assert "OpenAIGPTDoubleHeadsModel" in capsys.readouterr().err
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_python_call_rejects_what_is_not_a_list_of_examples(runs):
    predictor = Predictor.from_run(runs["classification"], device="cpu", fused=False)
    with pytest.raises(TypeError, match="wrap it in a list"):
        predictor.predict({"text": "to be"})
    with pytest.raises(TypeError, match="example 1 must be a dict"):
        predictor.predict([{"text": "to be"}, "to be"])
    with pytest.raises(ValueError, match="example 0: classification examples have the fields"):
        predictor.predict([{"sentence": "to be"}])


def test_fused_path_gives_the_reference_predictions(runs):
    examples = EXAMPLES["similarity"]
    ref = Predictor.from_run(runs["similarity"], device="cpu", fused=False)
    fused = Predictor.from_run(runs["similarity"], device="cpu", fused=True)
    assert fused.model.body.fused and not ref.model.body.fused
    a, b = ref.scores(ref.encode(examples)), fused.scores(fused.encode(examples))
    assert_close(torch.stack(b), torch.stack(a), "fused logits")


@pytest.mark.parametrize("kind", ["classification", "entailment"])
def test_transformers_pipeline_gives_the_same_predictions(runs, tmp_path, kind):
    """The exported tokenizer adds <start> / <delim> / <classify> itself; batches pad with <pad>."""
    predictor = Predictor.from_run(runs[kind], device="cpu", fused=False)
    predictor.export_hf(tmp_path / "hf")
    examples = EXAMPLES[kind]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for e, enc in zip(examples, predictor.encode(examples)):
        args = (e["text"], e["text_pair"]) if kind == "entailment" else (e["text"],)
        assert tuple(tok(*args)["input_ids"]) == enc.sequences[0]
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "hf"), tokenizer=tok, device="cpu")
    inputs = [{"text": e["text"], "text_pair": e["text_pair"]} if kind == "entailment" else e["text"] for e in examples]
    got = pipe(inputs, top_k=None, batch_size=len(inputs))
    for r, ours in zip(got, predictor.predict(examples)):
        probs = {d["label"]: d["score"] for d in r}
        assert max(probs, key=probs.get) == ours["prediction"]
        assert_close(
            torch.tensor([probs[k] for k in predictor.labels]),
            torch.tensor(list(ours["probabilities"].values())),
            "probabilities",
        )


@pytest.mark.parametrize("kind", ["classification", "multiple_choice"])
def test_truncated_inputs_are_counted_in_a_note_and_a_field(kind, runs, tmp_path, capsys):
    """Issue 23, item 5: a 100,000-character input was cut to max_len with no note anywhere
    (for multiple choice: the end of the context)."""
    predictor = Predictor.from_run(runs[kind], device="cpu", fused=False)
    long = "to be, or not to be " * 5000
    big = {"text": long} if kind == "classification" else {"context": long, "choices": ["yes", "no"]}
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps(e) + "\n" for e in [EXAMPLES[kind][0], big]))
    assert cli([str(runs[kind]), "--input", str(f), "--no-fused", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(x) for x in captured.out.splitlines()]
    (encoded,) = predictor.encode([big])
    assert [r["truncated_tokens"] for r in rows] == [0, encoded.truncated] and encoded.truncated > 10_000
    assert captured.err == (
        f"note: 1 of 2 inputs is longer than max_len {predictor.max_len} and was cut to it (by up to "
        f"{encoded.truncated:,} tokens, {encoded.truncated:,} in all; the end of the longest text goes first)\n"
    )
