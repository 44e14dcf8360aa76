"""`python -m engine.finetune`: fine-tune a pretrained GPT-1 on a task (the paper's §3.2–3.3).

    python -m engine.finetune --fused                       # shakespeare-cloze, from the default pretraining run
    python -m engine.finetune --init none                   # the same from random weights (no pre-training)
    python -m engine.finetune --task rte --data-dir glue_data/RTE --init runs/pretrain
    python -m engine.finetune --eval-only --init runs/finetune-rte   # re-evaluate a fine-tuned run

Each example becomes token sequences ending in the extract token (engine.data.transforms); a
linear head reads the extract token's final state (engine.heads); the objective is
L3 = L2 + λ·L1 with the LM loss L1 on the same sequences. Defaults are the paper's: lr 6.25e-5,
batch 32, 3 epochs, linear warm-up over 0.2% of the updates then linear decay, dropout 0.1,
λ = 0.5. The loop is engine.train's (AdamW, AMP, accumulation, DDP, atomic checkpoints,
resume, metrics.jsonl, progress bar, loss.png).

The run directory (--out) ends up holding the best dev checkpoint: config.json +
model.safetensors (Hugging Face openai-gpt layout, special tokens included), head.safetensors,
tokenizer.json, task.json; metrics.json (final dev metrics of that checkpoint, n_train, n_dev);
dev predictions; GLUE-format predictions for unlabelled test files; and the trainer's
train_config.json, metrics.jsonl, loss.png and checkpoints/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import checkpoint, cli, train
from .config import GPT1Config
from .data.records import Example
from .data.tasks import DEFAULT_TASK, TASKS, Task, get_task
from .data.transforms import Encoded, InputTransform, collate
from .fileio import _fsync_dir, atomic_write, atomic_write_text
from .heads import GPT1ForTask, TaskHead
from .metrics import compute
from .model import GPT1
from .tokenizer import BPETokenizer

# Where `python -m engine.pretrain` writes its run when given no --out.
PRETRAIN_DEFAULT_OUT = "runs/pretrain"
PRETRAIN_COMMAND = "python -m engine.pretrain --fused"
HEAD_FILE, TASK_FILE, TOKENIZER_FILE, METRICS_FILE = "head.safetensors", "task.json", "tokenizer.json", "metrics.json"
BEST = "best"  # the best dev checkpoint while training; moved into the run directory at the end
WARMUP_FRACTION = 0.002  # the paper: warm-up over 0.2% of training


# ---- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m engine.finetune",
        description="Fine-tune GPT-1 on a task with the paper's input transformations and auxiliary LM loss.",
    )
    g = p.add_argument_group("task and model")
    g.add_argument("--task", default=DEFAULT_TASK, help=f"task name: {', '.join(TASKS)} (default: {DEFAULT_TASK})")
    g.add_argument("--data-dir", default=None, help="directory holding the task's files in their published layout "
                   "(e.g. glue_data/RTE); embedded tasks need none (given, it replaces the packaged plays)")
    g.add_argument("--init", default=PRETRAIN_DEFAULT_OUT, help="run directory to start from (config.json + "
                   "model.safetensors + tokenizer), or 'none' for random weights; with --eval-only, the fine-tuned run "
                   f"(default: {PRETRAIN_DEFAULT_OUT}, where `{PRETRAIN_COMMAND}` writes)")
    g.add_argument("--arch", default=PRETRAIN_DEFAULT_OUT, help="with --init none: the run whose config.json and "
                   "tokenizer the random model takes, so the ablation differs from pretraining in the weights only "
                   f"(default: {PRETRAIN_DEFAULT_OUT})")
    g.add_argument("--preset", default=None, help="with --init none: a GPT1Config preset instead of --arch's config")
    g.add_argument("--tokenizer", default=None, help="a tokenizer.json to use instead of the run's")
    g.add_argument("--n-transfer", type=int, default=None, metavar="K", help="transfer the embeddings and the first K "
                   "blocks from --init, initialise the rest afresh (the paper's §5 layers-transferred ablation; default: all)")
    g.add_argument("--out", default=None, help="run directory (default: runs/finetune-<task>; with --eval-only: <init>/eval)")
    g.add_argument("--eval-only", action="store_true", help="evaluate the fine-tuned run --init on the dev (and test) files, no training")
    g.add_argument("--resume", default=None, metavar="DIR", help="continue the interrupted run in DIR with its saved settings")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument("--stop-at", type=int, default=None, metavar="STEP", help="checkpoint and exit after update STEP "
                   "without changing the schedule (split a run into sessions; continue with --resume)")
    h = p.add_argument_group("fine-tuning (the paper's defaults)")
    h.add_argument("--epochs", type=float, default=3.0, help="passes over the training set (default: 3)")
    h.add_argument("--lm-coef", type=float, default=0.5, help="λ in L3 = L2 + λ·L1; 0 disables the auxiliary LM loss (default: 0.5)")
    h.add_argument("--lm-average", default="token", choices=("token", "sequence"), help="L1 averaged over every token of the batch, "
                   "or per sequence then over sequences (OpenAI's code) (default: token)")
    h.add_argument("--dropout", type=float, default=0.1, help="dropout before the task head's linear layer (default: 0.1)")
    h.add_argument("--warmup-fraction", type=float, default=WARMUP_FRACTION, help="linear warm-up over this fraction of the updates (default: 0.002)")
    h.add_argument("--max-len", type=int, default=None, help="longest sequence in tokens (default: the model's n_positions)")
    h.add_argument("--eval-batch-size", type=int, default=None, help="examples per evaluation batch (default: --batch-size)")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    cli.add_dataclass_args(
        p, train.TrainConfig,
        defaults={"batch_size": 32, "lr": 6.25e-5, "schedule": "linear", "max_steps": None, "eval_every": None,
                  "checkpoint_every": None, "warmup_steps": None},
        helps={
            "max_steps": "updates in the run; overrides --epochs (default: epochs × ceil(n_train / batch size))",
            "batch_size": "examples per update, over all processes and accumulation steps (paper: 32) (default: 32)",
            "lr": "peak learning rate (paper: 6.25e-5) (default: 6.25e-05)",
            "warmup_steps": "updates of linear warm-up (default: --warmup-fraction of the updates, at least 1)",
            "eval_every": "evaluate on dev (and keep the best checkpoint) every N updates (default: once per epoch)",
            "checkpoint_every": "checkpoint every N updates (default: once per epoch)",
            "schedule": "decay after warm-up (paper, fine-tuning: linear) (default: linear)",
        },
        skip=("out",),
    )
    return p


FINETUNE_TRAIN_DEFAULTS = {"batch_size": 32, "lr": 6.25e-5, "schedule": "linear"}
# Settings a resumed run may change: where and how it runs, not what it computes.
RESUME_MAY_CHANGE = ("device", "fused", "compile", "prefetch", "quiet", "resume", "overwrite", "log_every", "stop_at")


# ---- loading models and tokenizers -------------------------------------------------------------


def load_tokenizer(run_dir: Path, override: str | None = None) -> BPETokenizer:
    """tokenizer.json (this engine), vocab.json + merges.txt (Hugging Face openai-gpt), or
    encoder_bpe_40000.json + vocab_40000.bpe (OpenAI's GPT-1 release)."""
    if override:
        return BPETokenizer.load(override)
    if (run_dir / TOKENIZER_FILE).is_file():
        return BPETokenizer.load(run_dir / TOKENIZER_FILE)
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder_bpe_40000.json", "vocab_40000.bpe")):
        if (run_dir / vocab).is_file() and (run_dir / merges).is_file():
            return BPETokenizer.from_gpt1_files(run_dir / vocab, run_dir / merges)
    raise FileNotFoundError(f"no tokenizer in {run_dir} (tokenizer.json, or vocab.json + merges.txt); pass --tokenizer PATH")


def _missing_run(path: Path, what: str) -> FileNotFoundError:
    if str(path) == PRETRAIN_DEFAULT_OUT:
        return FileNotFoundError(
            f"no pretrained run at {path} ({what}): make one with `{PRETRAIN_COMMAND}`, "
            f"or pass --init RUN_DIR, or --init none to fine-tune from random weights"
        )
    return FileNotFoundError(f"{what}: {path} is not a run directory (config.json + model.safetensors)")


def add_task_tokens(body: GPT1, tokenizer: BPETokenizer) -> None:
    """Appends start / delimiter / extract / pad to the vocabulary and gives them embedding
    rows drawn from N(0, initializer_range), as the paper's new tokens."""
    fresh = any(tokenizer.token_to_id(t) is None for t in ("<start>", "<delim>", "<classify>", "<pad>"))
    sp = tokenizer.add_special_tokens()
    if body.config.vocab_size < tokenizer.vocab_size:
        body.resize_token_embeddings(tokenizer.vocab_size)  # new rows: N(0, 0.02)
    elif fresh:  # the table already has rows there (a padded vocabulary): draw them anew
        with torch.no_grad():
            for i in (sp.start, sp.delimiter, sp.classify, sp.pad):
                body.tokens_embed.weight[i].normal_(0.0, body.config.initializer_range)


def load_body(args: argparse.Namespace) -> tuple[GPT1, BPETokenizer, str]:
    """(body with the task tokens added, tokenizer, a description of where it came from)."""
    if args.init == "none":
        arch = Path(args.arch)
        if args.preset is None and not (arch / "config.json").is_file():
            raise _missing_run(arch, "--init none takes its config and tokenizer from --arch (or --preset with --tokenizer)")
        tokenizer = load_tokenizer(arch, args.tokenizer)
        base_vocab = tokenizer.vocab_size
        if args.preset is not None:
            config = GPT1Config.from_name(args.preset, vocab_size=base_vocab)
        else:
            config = GPT1Config.from_json_file(arch / "config.json")
        body = GPT1(config, fused=args.fused)
        source = f"random init ({args.preset or arch / 'config.json'})"
    else:
        init = Path(args.init)
        if not (init / "config.json").is_file():
            raise _missing_run(init, "--init")
        tokenizer = load_tokenizer(init, args.tokenizer)
        body = GPT1.from_pretrained(init, fused=args.fused)
        if tokenizer.vocab_size > body.config.vocab_size + 4:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but {init} has only {body.config.vocab_size} embedding rows")
        source = str(init)
        if args.n_transfer is not None:
            body.reset_blocks(args.n_transfer)
            source += f" (embeddings + {args.n_transfer} of {body.config.n_layer} blocks)"
    add_task_tokens(body, tokenizer)
    return body, tokenizer, source


def make_head(task: Task, body: GPT1, dropout: float) -> TaskHead:
    return TaskHead(task.kind, body.config.n_embd, task.n_labels, pdrop=dropout, initializer_range=body.config.initializer_range)


def save_head(head: TaskHead, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    atomic_write(path / HEAD_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def load_head(head: TaskHead, path: Path) -> None:
    from safetensors.torch import load_file

    file = path / HEAD_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {HEAD_FILE} in {path}: not a fine-tuned run")
    state = load_file(str(file), device=str(head.linear.weight.device))
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{file} does not fit the task's head: {str(e).splitlines()[0]}") from None


def _save_weights(model: GPT1ForTask, path: Path) -> None:
    model.body.save_pretrained(path)
    save_head(model.head, path)


def _load_weights(model: GPT1ForTask, path: Path) -> None:
    from .hf import load_pretrained

    config, state = load_pretrained(path)
    if config != model.body.config:
        raise ValueError(f"{path}: checkpoint config differs from the model's")
    model.body.load_state_dict(state)
    load_head(model.head, path)


TASK_WEIGHTS = checkpoint.WeightsIO(_save_weights, _load_weights)
"""Body in the Hugging Face layout + head.safetensors."""


def save_run(model: GPT1ForTask, tokenizer: BPETokenizer, meta: dict[str, Any], path: Path) -> None:
    """A self-contained fine-tuned checkpoint, written to a temporary directory and renamed
    into place (the old one is removed only after the new one is complete)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _save_weights(model, tmp)
        tokenizer.save(tmp / TOKENIZER_FILE)
        atomic_write_text(tmp / TASK_FILE, json.dumps(meta, indent=2) + "\n")
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_run(src: Path, dst: Path) -> None:
    """Copies a checkpoint's files into the run directory, each atomically."""
    for f in sorted(src.iterdir()):
        if f.is_file():
            atomic_write(dst / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp))


# ---- data ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Split:
    """One named set of examples and its encoding."""

    name: str
    examples: list[Example]
    encoded: list[Encoded]

    @property
    def labelled(self) -> bool:
        return all(e.label is not None for e in self.examples)


def load_splits(task: Task, data_dir: Path | None, split: str, transform: InputTransform) -> list[Split]:
    return [Split(name, ex, transform(ex)) for name, ex in task.load(data_dir, split).items()]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batch_fn(train_set: Sequence[Encoded], batch_size: int, seed: int, pad_id: int):
    """engine.train's batches(step, start, count): the examples of update `step` are the next
    batch_size of a sequence of epoch-wise shuffles; a pure function of its arguments."""
    n = len(train_set)
    orders: dict[int, list[int]] = {}

    def batches(step: int, start: int, count: int) -> dict[str, Any]:
        items = []
        for i in range(step * batch_size + start, step * batch_size + start + count):
            epoch, pos = divmod(i, n)
            if epoch not in orders:
                orders[epoch] = epoch_order(n, seed, epoch)
            items.append(train_set[orders[epoch][pos]])
        return collate(items, pad_id).as_dict()

    return batches


# ---- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def predict(
    model: GPT1ForTask, encoded: Sequence[Encoded], batch_size: int, device: torch.device, pad_id: int,
    autocast: torch.dtype | None = None, dist: train.DistEnv | None = None,
) -> tuple[list[Any], float | None]:
    """(prediction per example, mean L3 over the set or None when unlabelled). Examples go in
    batches of similar length; under DDP each process takes every world_size-th batch."""
    dist = dist or train.DistEnv(device=device)
    order = sorted(range(len(encoded)), key=lambda i: max(len(s) for s in encoded[i].sequences))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    found: dict[int, Any] = {}
    loss_sum, count = 0.0, 0
    try:
        for chunk in chunks[dist.rank :: dist.world_size]:
            batch = train.to_device(collate([encoded[i] for i in chunk], pad_id).as_dict(), device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                out = model(**batch)
            preds = model.head.predict(out.out).tolist()
            found.update(zip(chunk, preds))
            if out.loss is not None:
                loss_sum += out.loss.float().item() * len(chunk)
                count += len(chunk)
    finally:
        model.train(was_training)
    if dist.distributed:
        gathered: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, (found, loss_sum, count))
        found = {k: v for part, _, _ in gathered for k, v in part.items()}
        loss_sum, count = sum(g[1] for g in gathered), sum(g[2] for g in gathered)
    return [found[i] for i in range(len(encoded))], (loss_sum / count if count else None)


def score_split(task: Task, split: Split, preds: list[Any]) -> dict[str, float]:
    gold = [e.label for e in split.examples]
    return compute(task.metrics, preds, gold)


def format_prediction(task: Task, pred: Any) -> str:
    """As a GLUE submission writes it: the label string, the choice index, or the score (0-5)."""
    if task.kind == "regression":
        return f"{min(5.0, max(0.0, float(pred))):.3f}"
    if task.labels:
        return task.labels[int(pred)]
    return str(int(pred))


def write_predictions(task: Task, split: Split, preds: list[Any], path: Path, with_labels: bool) -> None:
    lines = ["index\tprediction" + ("\tlabel" if with_labels else "")]
    for ex, p in zip(split.examples, preds):
        row = [ex.uid, format_prediction(task, p)]
        if with_labels:
            row.append(format_prediction(task, ex.label))
        lines.append("\t".join(row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def evaluate_all(
    task: Task, model: GPT1ForTask, dev: list[Split], test: list[Split], out: Path, batch_size: int,
    device: torch.device, pad_id: int, known: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Scores every dev set (and labelled test set), writes their predictions and GLUE-format
    predictions for unlabelled test sets; returns metrics.json's content (without counts).
    ``known``: {dev set name: {"preds", "loss"}} already computed with these weights."""
    known = known or {}
    result: dict[str, Any] = {"dev": {}, "test": {}}
    for kind, sets in (("dev", dev), ("test", test)):
        for split in sets:
            if kind == "dev" and split.name in known:
                preds, loss = known[split.name]["preds"], known[split.name]["loss"]
            else:
                preds, loss = predict(model, split.encoded, batch_size, device, pad_id)
            suffix = "" if len(sets) == 1 else f"_{split.name}"
            if split.labelled:
                scores = score_split(task, split, preds)
                result[kind][split.name] = {**scores, "n": len(split.examples), **({"loss": loss} if loss is not None else {})}
                write_predictions(task, split, preds, out / f"{kind}_predictions{suffix}.tsv", with_labels=True)
            else:
                name = task.submission.get(split.name, f"{task.name}{suffix}.tsv")
                write_predictions(task, split, preds, out / "predictions" / name, with_labels=False)
    primary = result["dev"][dev[0].name]
    result.update({k: v for k, v in primary.items() if k in task.metrics})
    return result


# ---- the run ----------------------------------------------------------------------------------------


def _resolve_train_config(args: argparse.Namespace, out: Path, n_train: int) -> train.TrainConfig:
    given = cli.dataclass_kwargs(train.TrainConfig, args)
    kw = {**FINETUNE_TRAIN_DEFAULTS, **given, "out": str(out)}
    batch = kw["batch_size"]
    steps_per_epoch = math.ceil(n_train / batch)
    if "max_steps" not in given:
        if not args.epochs > 0:
            raise ValueError(f"--epochs must be positive, got {args.epochs}")
        kw["max_steps"] = max(1, math.ceil(args.epochs * n_train / batch))
    if "warmup_steps" not in given:
        if not 0 <= args.warmup_fraction < 1:
            raise ValueError(f"--warmup-fraction must be in [0, 1), got {args.warmup_fraction}")
        kw["warmup_steps"] = max(1, math.ceil(args.warmup_fraction * kw["max_steps"]))
    kw.setdefault("eval_every", min(steps_per_epoch, kw["max_steps"]))
    kw.setdefault("checkpoint_every", min(steps_per_epoch, kw["max_steps"]))
    kw.setdefault("log_every", max(1, min(10, kw["max_steps"] // 10)))
    return train.TrainConfig(**kw)


def _check_args(args: argparse.Namespace) -> None:
    if args.lm_coef < 0 or not math.isfinite(args.lm_coef):
        raise ValueError(f"--lm-coef must be a finite number >= 0, got {args.lm_coef}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.max_len is not None and args.max_len < 4:
        raise ValueError(f"--max-len must be at least 4 (start, delimiter, extract and one token), got {args.max_len}")
    if args.stop_at is not None and args.stop_at <= 0:
        raise ValueError(f"--stop-at must be a positive update number, got {args.stop_at}")
    if vars(args).get("n_transfer") is not None and args.init == "none":
        raise ValueError("--n-transfer needs --init RUN_DIR: with --init none no layer is pretrained")
    if args.eval_batch_size is not None and args.eval_batch_size <= 0:
        raise ValueError(f"--eval-batch-size must be positive, got {args.eval_batch_size}")


def _max_len(args: argparse.Namespace, body: GPT1) -> int:
    P = body.config.n_positions
    if args.max_len is not None and args.max_len > P:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's n_positions ({P})")
    return args.max_len or P


def _task_meta(task: Task, args: argparse.Namespace, max_len: int, source: str) -> dict[str, Any]:
    return {
        "task": task.name, "kind": task.kind, "labels": list(task.labels), "metrics": list(task.metrics),
        "max_len": max_len, "lm_coef": args.lm_coef, "lm_average": args.lm_average, "dropout": args.dropout, "init": source,
        "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
    }


def _print(msg: str, dist: train.DistEnv | None = None) -> None:
    if dist is None or dist.is_main:
        print(msg, flush=True)


def _summary(task: Task, result: dict[str, Any]) -> str:
    parts = []
    for kind in ("dev", "test"):
        for name, scores in result.get(kind, {}).items():
            shown = ", ".join(f"{m} {scores[m]:.4f}" for m in task.metrics)
            parts.append(f"{kind if name == kind else f'{kind} {name}'}: {shown} (n={scores['n']})")
    return "; ".join(parts)


def finetune(args: argparse.Namespace) -> int:
    if args.resume:
        args = _restore_args(args)
    _check_args(args)
    task = get_task(args.task)
    data_dir = Path(args.data_dir) if args.data_dir else None
    out = Path(args.out or f"runs/finetune-{task.name}")
    resume_from = checkpoint.prepare_run_dir(out, resume=bool(args.resume), overwrite=args.overwrite)
    dist = train.setup_distributed(vars(args).get("device", "auto"))
    try:
        return _finetune(args, task, data_dir, out, resume_from, dist)
    finally:
        train.teardown_distributed()


def _finetune(args: argparse.Namespace, task: Task, data_dir: Path | None, out: Path, resume_from: Path | None,
              dist: train.DistEnv) -> int:
    t0 = time.perf_counter()
    torch.manual_seed(vars(args).get("seed", 0))  # the same new rows, head (and --init none weights) on every rank
    body, tokenizer, source = load_body(args)
    max_len = _max_len(args, body)
    transform = InputTransform(tokenizer, task.kind, max_len)
    (train_split,) = load_splits(task, data_dir, "train", transform)
    dev = load_splits(task, data_dir, "dev", transform)
    test = load_splits(task, data_dir, "test", transform)
    if not train_split.labelled:
        raise ValueError(f"task {task.name!r}: the training set has unlabelled examples")
    cfg = _resolve_train_config(args, out, len(train_split.examples))
    # Everything is read and checked: only now is a run being replaced cleared.
    if dist.is_main:
        if args.overwrite:
            checkpoint.clear_run_dir(out)
            for name in (BEST, HEAD_FILE, TASK_FILE, METRICS_FILE, "predictions"):
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    head = make_head(task, body, args.dropout)
    if task.kind == "regression":
        head.set_target_stats(torch.tensor([float(e.label) for e in train_split.examples]))
    model = GPT1ForTask(body, head, lm_coef=args.lm_coef, lm_average=args.lm_average)
    sp = tokenizer.special_tokens()
    meta = _task_meta(task, args, max_len, source)
    eval_bs = args.eval_batch_size or cfg.batch_size

    n_params = sum(p.numel() for p in model.parameters())
    seq_tokens = [sum(len(s) for s in e.sequences) for e in train_split.encoded]
    mean_tokens = sum(seq_tokens) / len(seq_tokens)
    mean_len = mean_tokens / len(train_split.encoded[0].sequences)
    _print(f"task {task.name} ({task.kind}): {len(train_split.examples)} train, "
           + ", ".join(f"{len(s.examples)} {s.name}" for s in dev + test)
           + f" | init {source} | {n_params / 1e6:.2f}M parameters, max_len {max_len}, mean sequence {mean_len:.0f} tokens", dist)
    _print("config: " + json.dumps({**dataclasses.asdict(cfg), "lm_coef": args.lm_coef, "dropout": args.dropout,
                                   "epochs": args.epochs}), dist)
    if dist.is_main and resume_from is None:
        atomic_write_text(out / checkpoint.RUN_CONFIG, json.dumps({"train": dataclasses.asdict(cfg), "args": _args_dict(args)}, indent=2) + "\n")

    best = {"score": -math.inf, "step": 0}
    best_dev: dict[str, Any] = {}  # the best checkpoint's predictions on the first dev set (this process's run)
    primary = task.metrics[0]

    def evaluate(trainer: train.Trainer) -> dict[str, float]:
        preds, loss = predict(trainer.model, dev[0].encoded, eval_bs, trainer.device, sp.pad, trainer.autocast, trainer.dist)
        scores = score_split(task, dev[0], preds)
        if scores[primary] > best["score"]:
            best.update(score=scores[primary], step=trainer.step)
            best_dev.update(preds=preds, loss=loss)
            if trainer.dist.is_main:
                save_run(trainer.model, tokenizer, {**meta, "step": trainer.step, "dev": scores}, out / BEST)
            trainer.dist.barrier()
        return {"val_loss": loss, **{f"dev_{k}": v for k, v in scores.items()}}

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]):
        o = m(**batch)
        extra = {"task_loss": o.task_loss.item()}
        if o.lm_loss is not None:
            extra["lm_loss"] = o.lm_loss.item()
        return o.loss, extra

    trainer = train.Trainer(
        model, cfg, loss_fn, batch_fn(train_split.encoded, cfg.batch_size, cfg.seed, sp.pad),
        evaluate=evaluate, dist=dist, tokens_per_sample=round(mean_tokens),
        flops_per_token=train.flops_per_token(n_params, body.config.n_layer, body.config.n_embd, round(mean_len)),
        weights=TASK_WEIGHTS, extra_state=lambda: dict(best),
        load_extra_state=lambda s: best.update(s), resume_from=resume_from, progress=not args.quiet,
    )
    result = trainer.fit(stop_at=args.stop_at)
    if result.status == "interrupted":
        return 128 + (result.signal or 0)
    if result.status == "diverged":
        return 1
    if result.status == "stopped":
        _print(f"stopped at update {result.step} (--stop-at); checkpoint {result.checkpoint}; continue with --resume {out}", dist)
        return 0
    if not dist.is_main:
        return 0
    # The run directory gets the best dev checkpoint (the trainer left the final weights there).
    if (out / BEST).is_dir():  # absent when --resume found the run already finished
        install_run(out / BEST, out)
        shutil.rmtree(out / BEST, ignore_errors=True)
    _load_weights(model, out)
    res = evaluate_all(task, model, dev, test, out, eval_bs, trainer.device, sp.pad, known={dev[0].name: best_dev} if best_dev else {})
    metrics = {"task": task.name, **{k: res[k] for k in task.metrics}, "n_train": len(train_split.examples),
               "n_dev": len(dev[0].examples), "best_step": best["step"], "steps": result.step, "init": source,
               "dev": res["dev"], "test": res["test"], "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    print(f"{_summary(task, res)} | best at update {best['step']} of {result.step} | "
          f"{metrics['wall_s']:.0f}s | run directory {out}", flush=True)
    return 0


def _args_dict(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}


def _restore_args(args: argparse.Namespace) -> argparse.Namespace:
    """--resume DIR: the saved run's settings, except where and how it runs."""
    saved_file = Path(args.resume) / checkpoint.RUN_CONFIG
    if not saved_file.is_file():
        raise FileNotFoundError(f"--resume {args.resume}: no {checkpoint.RUN_CONFIG} there (not a fine-tuning run)")
    saved = json.loads(saved_file.read_text()).get("args")
    if not isinstance(saved, dict):
        raise ValueError(f"{saved_file} holds no fine-tuning settings")
    merged = {**saved, **{k: v for k, v in vars(args).items() if k in RESUME_MAY_CHANGE and k in vars(args)}}
    merged["out"], merged["resume"], merged["overwrite"] = args.resume, args.resume, False
    return argparse.Namespace(**merged)


def eval_only(args: argparse.Namespace) -> int:
    """Re-evaluates the fine-tuned run --init on its task's dev (and test) files."""
    _check_args(args)
    run = Path(args.init)
    if args.init == "none" or not (run / TASK_FILE).is_file():
        raise FileNotFoundError(f"--eval-only needs --init RUN_DIR of a fine-tuned run ({TASK_FILE} + {HEAD_FILE}); {run} has no {TASK_FILE}")
    meta = json.loads((run / TASK_FILE).read_text())
    name = meta.get("task")
    task = get_task(name)
    if args.task not in (DEFAULT_TASK, name):
        raise ValueError(f"{run} was fine-tuned on {name!r}, not {args.task!r}")
    data_dir = Path(args.data_dir) if args.data_dir else (Path(meta["data_dir"]) if meta.get("data_dir") else None)
    out = Path(args.out) if args.out else run / "eval"
    device = train.resolve_device(vars(args).get("device", "auto"))
    body = GPT1.from_pretrained(run, fused=args.fused)
    tokenizer = load_tokenizer(run, args.tokenizer)
    tokenizer.special_tokens()  # a fine-tuned run's tokenizer has them
    head = make_head(task, body, meta.get("dropout", 0.1))
    load_head(head, run)
    model = GPT1ForTask(body, head, lm_coef=meta.get("lm_coef", 0.5)).to(device)
    transform = InputTransform(tokenizer, task.kind, int(meta.get("max_len", body.config.n_positions)))
    dev = load_splits(task, data_dir, "dev", transform)
    test = load_splits(task, data_dir, "test", transform)
    out.mkdir(parents=True, exist_ok=True)
    bs = args.eval_batch_size or vars(args).get("batch_size", 32)
    res = evaluate_all(task, model, dev, test, out, bs, device, tokenizer.special_tokens().pad)
    metrics = {"task": task.name, **{k: res[k] for k in task.metrics}, "n_dev": len(dev[0].examples),
               "run": str(run), "dev": res["dev"], "test": res["test"]}
    atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    print(f"{_summary(task, res)} | {out / METRICS_FILE}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.fused = vars(args).get("fused", True)
    if args.fused:
        _check_fused()
    return eval_only(args) if args.eval_only else finetune(args)


def _check_fused() -> None:
    """The fused path on CPU needs the C++ kernels: say so up front, not mid-run."""
    from . import ops

    if not torch.cuda.is_available():
        err = ops.cpu_kernels_error()
        if err:
            raise cli.UserError(f"{err} (or pass --no-fused)")


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
