"""`python -m engine.predict RUN --input FILE`: apply a fine-tuned run to new examples.

    python -m engine.predict runs/finetune-rte --input pairs.jsonl              # JSONL to stdout
    python -m engine.predict runs/finetune-sst2 --input glue_data/SST-2/test.tsv --output preds.jsonl
    python -m engine.predict runs/finetune-rte --export-hf hf/rte               # for transformers

From Python:

    from engine.predict import Predictor
    predictor = Predictor.from_run("runs/finetune-rte", device="cpu")
    predictor.predict([{"text": "A man sleeps.", "text_pair": "Nobody is asleep."}])
    # [{"id": "0", "prediction": "not_entailment", "probabilities": {"entailment": 0.2, "not_entailment": 0.8},
    #   "truncated_tokens": 0}]

RUN is what `python -m engine.finetune` writes (config.json + model.safetensors +
head.safetensors + tokenizer.json + task.json). Examples go through the run's own input
transformation (task.json's kind and max_len: the paper's start / delimiter / extract tokens).

Input, one example per line of a JSONL file (or one dict each in Python), by the task's kind:

    classification                     {"text": ...}
    entailment, similarity, regression {"text": ..., "text_pair": ...}   (premise, hypothesis)
    multiple_choice                    {"context": ... or [..., ...], "choices": [..., ...]}
                                       (a list context is several pieces: RACE's article, question)

with an optional "id" (echoed; default: the line number, or the index in Python) and an
optional "label" (ignored). A .tsv file is read as the test file of the run's GLUE task
(header row, GLUE's column names; e.g. SST-2's index, sentence).

Output, one JSON object per example: {"id", "prediction", "probabilities", "truncated_tokens"}:
the label name and {label: p} for classification, entailment and similarity; the choice index
and a list of probabilities for multiple choice; no probabilities, the score, for regression.
truncated_tokens: how many tokens the input lost to max_len (0 when it fit); the CLI also says
on stderr how many inputs were cut (engine.data.transforms.InputReport).

--export-hf DIR writes the run for transformers (engine.model.hf_export), with the same
predictions: multiple choice as OpenAIGPTDoubleHeadsModel, the other kinds as
OpenAIGPTForSequenceClassification (similarity and regression: the logits of the two orders
added). Feed either the run's transformed sequences (Predictor.batch); engine.model.hf_export says how.
The exported tokenizer adds the transformation's tokens itself, so
transformers.pipeline("text-classification", model=DIR) gives a classification or entailment
run's predictions (for inputs within max_len).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from engine.cli import ArgumentParser, run_cli
from engine.data.records import Example, fail, jsonl_rows
from engine.data.transforms import Batch, Encoded, InputReport, InputTransform, collate
from engine.inference.runs import add_runtime_args, inference_device, run_dir
from engine.model.finetuned import load_finetuned
from engine.model.heads import GPT1ForTask
from engine.model.tokenizer import BPETokenizer

CLASS_KINDS = ("classification", "entailment", "similarity")
# The JSONL fields of an example, by kind: (required, optional).
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "classification": (("text",), ("id", "label")),
    "entailment": (("text", "text_pair"), ("id", "label")),
    "similarity": (("text", "text_pair"), ("id", "label")),
    "regression": (("text", "text_pair"), ("id", "label")),
    "multiple_choice": (("context", "choices"), ("id", "label")),
}


# ---- examples -------------------------------------------------------------------------------


def example_from_record(record: Mapping[str, Any], kind: str, uid: str, where: str) -> Example:
    """An Example from one JSONL object (or dict); a missing, unknown or mistyped field is a
    ValueError naming `where` (file:line, or the index)."""
    required, optional = FIELDS[kind]
    missing = [k for k in required if k not in record]
    unknown = [k for k in record if k not in required + optional]
    if missing or unknown:
        raise ValueError(
            f"{where}: {kind} examples have the fields {list(required)} (optional {list(optional)}); "
            + (f"missing {missing}" if missing else f"unknown {unknown}")
        )
    uid = str(record.get("id", uid))
    if kind != "multiple_choice":
        texts = tuple(record[k] for k in required)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{where}: {' and '.join(repr(k) for k in required)} must be strings")
        return Example(uid, texts)
    context, choices = record["context"], record["choices"]
    pieces = (context,) if isinstance(context, str) else tuple(context) if isinstance(context, list) else None
    if not pieces or not all(isinstance(p, str) for p in pieces):
        raise ValueError(f"{where}: 'context' must be a string or a non-empty list of strings")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be a non-empty list of strings")
    return Example(uid, pieces, tuple(choices))


def read_input(path: Path, kind: str, task: str) -> list[Example]:
    """--input: JSONL in FIELDS' layout, or a .tsv test file of the run's GLUE task."""
    if path.suffix.lower() == ".tsv":
        return _read_glue_test(path, task)
    examples = [example_from_record(row, kind, f"{path.name}:{n}", f"{path}:{n}") for n, row in jsonl_rows(path)]
    if not examples:
        raise fail(path, None, "holds no examples")
    return examples


def _read_glue_test(path: Path, task: str) -> list[Example]:
    from engine.data import glue

    if task != "cola" and task not in glue.GLUE:
        raise ValueError(
            f"--input {path}: a .tsv is read in a GLUE task's layout, and this run's task {task!r} "
            f"is not a GLUE task; give JSONL (see python -m engine.predict --help)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"--input file not found: {path}")
    if task == "cola":
        return glue.read_cola(path, labelled=False)
    return glue.read_glue_tsv(path, glue.GLUE[task], labelled=False)


# ---- the predictor ----------------------------------------------------------------------------


@dataclass
class Predictor:
    """A fine-tuned run ready to score examples: ``Predictor.from_run(dir).predict(examples)``."""

    model: GPT1ForTask
    tokenizer: BPETokenizer
    task: str
    kind: str
    labels: tuple[str, ...]
    max_len: int

    @classmethod
    def from_run(cls, run: str | Path, device: str = "auto", fused: bool = True) -> "Predictor":
        """Loads RUN (see the module doc) onto `device` ('auto', 'cpu' or 'cuda')."""
        path = run_dir(run)
        dev = inference_device(device, fused)
        model, tokenizer, meta = load_finetuned(path, fused)
        n_positions = model.body.config.n_positions
        labels = tuple(meta.labels)
        return cls(model.to(dev).eval(), tokenizer, meta.task, meta.kind, labels, min(meta.max_len, n_positions))

    @property
    def device(self) -> torch.device:
        return self.model.body.tokens_embed.weight.device

    def examples(self, items: Iterable[Mapping[str, Any] | Example]) -> list[Example]:
        """Dicts (FIELDS' layout) or Examples, as Examples."""
        if isinstance(items, (Mapping, str)):
            raise TypeError(
                f"examples must be a list of dicts or Examples, got one {type(items).__name__}: wrap it in a list"
            )
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, (Mapping, Example)):
                raise TypeError(f"example {i} must be a dict or an Example, got {type(item).__name__}")
            out.append(
                item if isinstance(item, Example) else example_from_record(item, self.kind, str(i), f"example {i}")
            )
        return out

    def encode(self, items: Iterable[Mapping[str, Any] | Example]) -> list[Encoded]:
        """The token sequences of each example after the run's input transformation."""
        return InputTransform(self.tokenizer, self.kind, self.max_len)(self.examples(items))

    def batch(self, items: Iterable[Mapping[str, Any] | Example]) -> Batch:
        """One right-padded batch: input_ids (B, S, T) and the extract positions (B, S), which
        transformers' models take as input_ids and mc_token_ids."""
        return collate(self.encode(items), self.tokenizer.special_tokens().pad)

    @torch.no_grad()
    def scores(self, encoded: list[Encoded], batch_size: int = 32) -> list[torch.Tensor]:
        """The head's raw output per example: logits (n_labels,), choice scores (S,) or the
        standardised score (), on the CPU. Batches hold examples of one shape, by length."""
        pad = self.tokenizer.special_tokens().pad
        order = sorted(
            range(len(encoded)), key=lambda i: (len(encoded[i].sequences), max(map(len, encoded[i].sequences)))
        )
        found: dict[int, torch.Tensor] = {}
        start = 0
        while start < len(order):
            S = len(encoded[order[start]].sequences)
            chunk = [i for i in order[start : start + batch_size] if len(encoded[i].sequences) == S]
            b = collate([encoded[i] for i in chunk], pad)
            out = self.model(b.input_ids.to(self.device), b.extract.to(self.device)).out.float().cpu()
            found.update(zip(chunk, out))
            start += len(chunk)
        return [found[i] for i in range(len(encoded))]

    def predict(self, items: Iterable[Mapping[str, Any] | Example], batch_size: int = 32) -> list[dict[str, Any]]:
        """One result per example (see the module doc for the fields)."""
        examples = self.examples(items)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        encoded = self.encode(examples)
        outs = self.scores(encoded, batch_size)
        return [
            {**self._result(ex.uid, out), "truncated_tokens": enc.truncated}
            for ex, enc, out in zip(examples, encoded, outs)
        ]

    def _result(self, uid: str, out: torch.Tensor) -> dict[str, Any]:
        if self.kind == "regression":
            return {"id": uid, "prediction": float(self.model.head.predict(out).item())}
        p = out.softmax(-1).tolist()
        k = int(out.argmax(-1))
        if self.kind == "multiple_choice":
            return {"id": uid, "prediction": k, "probabilities": p}
        return {"id": uid, "prediction": self.labels[k], "probabilities": dict(zip(self.labels, p))}

    def export_hf(self, path: str | Path) -> str:
        """Writes the run for transformers (engine.model.hf_export); returns the class name."""
        from engine.model.hf_export import save_task_model, save_task_tokenizer

        sp = self.tokenizer.special_tokens()
        name = save_task_model(self.model.body, self.model.head, self.labels, sp.pad, Path(path))
        save_task_tokenizer(self.tokenizer, self.max_len, Path(path))
        return name


# ---- command line -------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m engine.predict",
        description="Apply a fine-tuned run to new examples.",
        epilog="JSONL fields by kind: "
        + "; ".join(f"{k}: {', '.join(r)}" for k, (r, _) in FIELDS.items())
        + ' (optional "id", "label"). A .tsv input is the run\'s GLUE task\'s test layout.',
    )
    p.add_argument(
        "run",
        help="a fine-tuned run directory (config.json, model.safetensors, head.safetensors, tokenizer.json, task.json)",
    )
    p.add_argument(
        "--input",
        default=None,
        metavar="FILE",
        help="examples: .jsonl (fields by the task's kind, see below) or a GLUE .tsv",
    )
    p.add_argument(
        "--output", default=None, metavar="FILE", help="write the predictions (JSONL) here instead of stdout"
    )
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default: 32)")
    p.add_argument("--export-hf", default=None, metavar="DIR", help="write the run as a transformers model directory")
    add_runtime_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.input is None and args.export_hf is None:
        raise ValueError("nothing to do: pass --input FILE (predictions) and/or --export-hf DIR")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    predictor = Predictor.from_run(args.run, args.device, args.fused)
    if args.input is not None:
        examples = read_input(Path(args.input), predictor.kind, predictor.task)
        results = predictor.predict(examples, args.batch_size)
        _write_results(results, args.output)
        note = InputReport.of(examples, [r["truncated_tokens"] for r in results]).note("inputs", predictor.max_len)
        if note is not None:
            print(f"note: {note}", file=sys.stderr)
    if args.export_hf is not None:
        name = predictor.export_hf(args.export_hf)
        print(f"wrote {args.export_hf} ({name}; load with transformers.{name}.from_pretrained)", file=sys.stderr)
    return 0


def _write_results(results: list[dict[str, Any]], output: str | None) -> None:
    text = "".join(json.dumps(r) + "\n" for r in results)
    if output is None:
        sys.stdout.write(text)
        return
    from engine.fileio import atomic_write_text

    atomic_write_text(output, text)


if __name__ == "__main__":
    sys.exit(run_cli(main))
