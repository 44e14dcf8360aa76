"""A fine-tuned model applied to a task's splits: predictions, scores and the report files
(metrics.json, dev/test predictions, GLUE-format predictions for unlabelled test files), and
the re-scoring of a finished fine-tuned run (`python -m engine.finetune --eval-only`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from engine.data.splits import Split, load_splits
from engine.data.tasks import Task, get_task
from engine.data.transforms import Encoded, InputTransform, collate
from engine.fileio import atomic_write_text
from engine.inference.metrics import compute
from engine.model.finetuned import load_finetuned
from engine.model.heads import GPT1ForTask
from engine.training.distributed import DistEnv, resolve_device
from engine.training.prefetch import to_device
from engine.training.run import check_fused

METRICS_FILE = "metrics.json"


@dataclass
class Scorer:
    """`model` on `task`'s encoded examples: batches of similar length, `batch_size` examples
    each; under DDP (`dist`) each process takes every world_size-th batch."""

    task: Task
    model: GPT1ForTask
    pad_id: int
    batch_size: int = 32
    autocast: torch.dtype | None = None
    dist: DistEnv | None = None

    @torch.no_grad()
    def predict(self, encoded: Sequence[Encoded]) -> tuple[list[Any], float | None]:
        """(prediction per example, mean L3 over the set or None when unlabelled)."""
        device = next(self.model.parameters()).device
        dist = self.dist or DistEnv(device=device)
        order = sorted(range(len(encoded)), key=lambda i: max(len(s) for s in encoded[i].sequences))
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        was_training = self.model.training
        self.model.eval()
        found: dict[int, Any] = {}
        loss_sum, count = 0.0, 0
        try:
            for chunk in chunks[dist.rank :: dist.world_size]:
                batch = to_device(collate([encoded[i] for i in chunk], self.pad_id).as_dict(), device)
                with torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None):
                    out = self.model(**batch)
                found.update(zip(chunk, self.model.head.predict(out.out).tolist()))
                if out.loss is not None:
                    loss_sum += out.loss.float().item() * len(chunk)
                    count += len(chunk)
        finally:
            self.model.train(was_training)
        if dist.distributed:
            gathered: list[Any] = [None] * dist.world_size
            torch.distributed.all_gather_object(gathered, (found, loss_sum, count))
            found = {k: v for part, _, _ in gathered for k, v in part.items()}
            loss_sum, count = sum(g[1] for g in gathered), sum(g[2] for g in gathered)
        return [found[i] for i in range(len(encoded))], (loss_sum / count if count else None)

    def score(self, split: Split, preds: list[Any]) -> dict[str, float]:
        return compute(self.task.metrics, preds, [e.label for e in split.examples])

    def report(self, dev: list[Split], test: list[Split], out: Path, known: dict[str, Any] | None = None) -> dict:
        """Scores every dev set (and labelled test set), writes their predictions and GLUE-format
        predictions for unlabelled test sets; returns {"dev": {set: scores}, "test": ...} with
        the first dev set's metrics on top. ``known``: {dev set name: {"preds", "loss"}}
        already computed with these weights."""
        known = known or {}
        result: dict[str, Any] = {"dev": {}, "test": {}}
        for kind, sets in (("dev", dev), ("test", test)):
            for split in sets:
                if kind == "dev" and split.name in known:
                    preds, loss = known[split.name]["preds"], known[split.name]["loss"]
                else:
                    preds, loss = self.predict(split.encoded)
                suffix = "" if len(sets) == 1 else f"_{split.name}"
                if split.labelled:
                    scores = {**self.score(split, preds), "n": len(split.examples)}
                    result[kind][split.name] = {**scores, **({"loss": loss} if loss is not None else {})}
                    write_predictions(self.task, split, preds, out / f"{kind}_predictions{suffix}.tsv")
                else:
                    name = self.task.submission.get(split.name, f"{self.task.name}{suffix}.tsv")
                    write_predictions(self.task, split, preds, out / "predictions" / name)
        primary = result["dev"][dev[0].name]
        result.update({k: v for k, v in primary.items() if k in self.task.metrics})
        return result


def format_prediction(task: Task, pred: Any) -> str:
    """As a GLUE submission writes it: the label string, the choice index, or the score (0-5)."""
    if task.kind == "regression":
        return f"{min(5.0, max(0.0, float(pred))):.3f}"
    if task.labels:
        return task.labels[int(pred)]
    return str(int(pred))


def write_predictions(task: Task, split: Split, preds: list[Any], path: Path) -> None:
    """index, prediction (and the label when the split is labelled), tab-separated."""
    header = ["index", "prediction", *(["label"] if split.labelled else [])]
    lines = ["\t".join(header)]
    for ex, p in zip(split.examples, preds):
        row = [ex.uid, format_prediction(task, p), *([format_prediction(task, ex.label)] if split.labelled else [])]
        lines.append("\t".join(row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def summary(task: Task, result: dict[str, Any]) -> str:
    """One line: each scored set's metrics and size."""
    parts = []
    for kind in ("dev", "test"):
        for name, scores in result.get(kind, {}).items():
            shown = ", ".join(f"{m} {scores[m]:.4f}" for m in task.metrics)
            parts.append(f"{kind if name == kind else f'{kind} {name}'}: {shown} (n={scores['n']})")
    return "; ".join(parts)


@dataclass
class RunEvaluation:
    """A fine-tuned run re-scored on its task's dev (and test) files: `finetune --eval-only`."""

    run_dir: Path
    out: Path  # where metrics.json and the predictions go
    data_dir: Path | None = None  # the task's files (default: the ones the run was trained on)
    task: str | None = None  # when given, it must be the run's task
    tokenizer: str | None = None  # a tokenizer.json instead of the run's
    batch_size: int = 32
    device: str = "auto"
    fused: bool = True

    def __call__(self) -> str:
        """Scores the run, writes metrics.json and the predictions into `out`; returns a one-line summary."""
        device = resolve_device(self.device)
        check_fused(self.fused, device)
        model, tokenizer, meta = load_finetuned(self.run_dir, self.fused, self.tokenizer)
        task = get_task(meta.task)
        if self.task is not None and self.task != task.name:
            raise ValueError(f"{self.run_dir} was fine-tuned on {task.name!r}, not {self.task!r}")
        data_dir = self.data_dir or (Path(meta.data_dir) if meta.data_dir else None)
        transform = InputTransform(tokenizer, task.kind, meta.max_len)
        dev, test = (load_splits(task, data_dir, split, transform) for split in ("dev", "test"))
        self.out.mkdir(parents=True, exist_ok=True)
        scorer = Scorer(task, model.to(device), tokenizer.special_tokens().pad, self.batch_size)
        res = scorer.report(dev, test, self.out)
        metrics = {
            "task": task.name,
            **{k: res[k] for k in task.metrics},
            "n_dev": len(dev[0].examples),
            "run": str(self.run_dir),
            "dev": res["dev"],
            "test": res["test"],
        }
        atomic_write_text(self.out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        return f"{summary(task, res)} | {self.out / METRICS_FILE}"
