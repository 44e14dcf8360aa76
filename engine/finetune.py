"""`python -m engine.finetune`: fine-tune a pretrained GPT-1 on a task (the paper's §3.2–3.3).

    python -m engine.finetune --fused                       # shakespeare-cloze, from the default pretraining run
    python -m engine.finetune --init none                   # the same from random weights (no pre-training)
    python -m engine.finetune --init none --preset gpt1-small --tokenizer tok.json   # random weights, on its own
    python -m engine.finetune --task rte --data-dir glue_data/RTE --init runs/pretrain
    python -m engine.finetune --resume runs/finetune-rte    # continue an interrupted run (its settings apply)
    python -m engine.finetune --eval-only --init runs/finetune-rte   # re-evaluate a fine-tuned run

Each example becomes token sequences ending in the extract token (engine.data.transforms); a
linear head reads the extract token's final state (engine.model.heads); the objective is
L3 = L2 + λ·L1 with the LM loss L1 on the same sequences. Defaults are the paper's
(FinetuneConfig and PAPER_TRAIN): lr 6.25e-5, batch 32, 3 epochs, linear warm-up over 0.2% of
the updates then linear decay, dropout 0.1 before the head, λ = 0.5; on CPU, where the default
model is a 4-layer one, lr 1e-4 (CPU_LR). The loop is
engine.training.trainer's, the run's lifecycle (lock, saved config, resume policy, exit codes) engine.training.run's.

The run directory (--out) ends up holding the best dev checkpoint: config.json +
model.safetensors (Hugging Face openai-gpt layout, special tokens included), head.safetensors,
tokenizer.json, task.json; metrics.json (final dev metrics of that checkpoint, n_train, n_dev);
dev predictions; GLUE-format predictions for unlabelled test files; and the trainer's
train_config.json, metrics.jsonl, loss.png (L3, task and LM loss; the dev metric) and checkpoints/.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from engine import cli
from engine.data.records import Example
from engine.data.tasks import DEFAULT_TASK, TASKS, Task, get_task
from engine.data.transforms import Encoded, InputReport, InputTransform, collate
from engine.fileio import _fsync_dir, atomic_write, atomic_write_text, make_temp_dir
from engine.inference.metrics import compute
from engine.model.config import GPT1Config
from engine.model.gpt1 import GPT1
from engine.model.heads import GPT1ForTask, TaskHead, add_task_tokens
from engine.model.tokenizer import BPETokenizer
from engine.training import checkpoint, memory, run
from engine.training import trainer as train
from engine.training.config import TrainConfig
from engine.training.distributed import DistEnv, resolve_device
from engine.training.flops import flops_per_token
from engine.training.precision import resolve_precision
from engine.training.prefetch import to_device

# Where `python -m engine.pretrain` writes its run when given no --out.
PRETRAIN_DEFAULT_OUT = "runs/pretrain"
PRETRAIN_COMMAND = "python -m engine.pretrain --fused"
HEAD_FILE, TASK_FILE, TOKENIZER_FILE, METRICS_FILE = "head.safetensors", "task.json", "tokenizer.json", "metrics.json"
BEST = "best"  # the best dev checkpoint while training; moved into the run directory at the end
WARMUP_FRACTION = 0.002  # the paper: warm-up over 0.2% of training
# The paper's fine-tuning optimisation (§4.1), written once: --help shows it, runs use it.
PAPER_TRAIN: dict[str, Any] = {"batch_size": 32, "lr": 6.25e-5, "schedule": "linear"}
# On CPU the default model is pretraining's CPU one (gpt1-small: 4 x 256, 3.75M parameters,
# engine.pretrain.CPU_DEFAULTS), which, as in pretraining, takes a larger rate than the paper's
# 117M model. Measured on shakespeare-cloze (6000 train / 2000 dev, 3 epochs, 563 updates) from
# the default pretraining run against --init none, best dev accuracy: 6.25e-5 → 60.4% vs 50.9%;
# 1e-4 → 62.2% vs 50.6%; 3e-4 (3000 examples) → 59.9% vs 53.1%, the random start learning
# train-play cues in its first epoch that do not transfer.
CPU_LR = 1e-4
# The files of a fine-tuned model (what the best-dev checkpoint holds).
MODEL_FILES = ("config.json", "model.safetensors", HEAD_FILE, TOKENIZER_FILE, TASK_FILE)


# ---- configuration --------------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    """Task, model and fine-tuning (the paper's defaults)."""

    task: str = field(default=DEFAULT_TASK, metadata={"help": f"task name: {', '.join(TASKS)}"})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "directory holding the task's files in their published layout (e.g. glue_data/RTE); embedded tasks need none (given, it replaces the packaged plays) (default: none)"
        },
    )
    init: str = field(
        default=PRETRAIN_DEFAULT_OUT,
        metadata={
            "help": f"run directory to start from (config.json + model.safetensors + tokenizer), or 'none' for random weights; with --eval-only, the fine-tuned run (default: {PRETRAIN_DEFAULT_OUT}, where `{PRETRAIN_COMMAND}` writes)"
        },
    )
    arch: str | None = field(
        default=None,
        metadata={
            "help": f"with --init none: a run whose config.json and tokenizer (never its weights) the random model takes, so the ablation differs from pretraining in the weights only (default: {PRETRAIN_DEFAULT_OUT} unless --preset is given)"
        },
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": "with --init none: a GPT1Config preset (gpt1, gpt1-medium, gpt1-small, gpt1-tiny) instead of --arch's config; needs --tokenizer or --arch for the tokenizer (default: none)"
        },
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "a tokenizer.json to use instead of the run's (default: the run's own)"}
    )
    tokenizer_mode: str = field(
        default="hf",
        metadata={
            "help": "how text is cut into words when --init holds GPT-1's original vocabulary files (encoder_bpe_40000.json + vocab_40000.bpe, or vocab.json + merges.txt): hf (transformers) or openai (OpenAI's TextEncoder: ftfy + spaCy, pip install -e '.[openai]'); a tokenizer.json keeps its own",
            "choices": ("hf", "openai"),
        },
    )
    epochs: float = field(default=3.0, metadata={"help": "passes over the training set (paper: 3)"})
    lm_coef: float = field(
        default=0.5, metadata={"help": "λ in L3 = L2 + λ·L1; 0 disables the auxiliary LM loss (paper: 0.5)"}
    )
    lm_average: str = field(
        default="token",
        metadata={
            "help": "L1 averaged over every token of the batch, or per sequence then over sequences (OpenAI's code)",
            "choices": ("token", "sequence"),
        },
    )
    n_transfer: int | None = field(
        default=None,
        metadata={
            "help": "transfer the embeddings and the first K blocks from --init and initialise the rest afresh (the paper's §5 layers-transferred ablation) (default: all)"
        },
    )
    head_dropout: float = field(
        default=0.1, metadata={"help": "dropout before the task head's linear layer (paper: 0.1)"}
    )
    dropout: float | None = field(
        default=None,
        metadata={
            "help": "the model's residual, embedding and attention dropout (default: the model's config, 0.1 as the paper)"
        },
    )
    warmup_fraction: float = field(
        default=WARMUP_FRACTION, metadata={"help": "linear warm-up over this fraction of the updates (paper: 0.2%%)"}
    )
    max_len: int | None = field(
        default=None, metadata={"help": "longest sequence in tokens (default: the model's n_positions)"}
    )
    eval_batch_size: int | None = field(
        default=None, metadata={"help": "examples per evaluation batch (default: --batch-size)"}
    )

    def __post_init__(self) -> None:
        get_task(self.task)  # "unknown task ..." with the list
        for name in ("epochs", "lm_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{cli.flag_name(name)} must be a finite number >= 0, got {value!r}")
        if not self.epochs > 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs!r}")
        for name in ("head_dropout", "dropout", "warmup_fraction"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{cli.flag_name(name)} must be in [0, 1), got {value!r}")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 4):
            raise ValueError(
                f"--max-len must be at least 4 (start, delimiter, extract and one token), got {self.max_len!r}"
            )
        if self.eval_batch_size is not None and (
            not isinstance(self.eval_batch_size, int) or self.eval_batch_size <= 0
        ):
            raise ValueError(f"--eval-batch-size must be a positive integer, got {self.eval_batch_size!r}")
        if self.preset is not None:
            from engine.model.config import PRESETS

            if self.preset not in PRESETS:
                raise ValueError(f"unknown --preset {self.preset!r}; expected one of {', '.join(PRESETS)}")
        if self.tokenizer_mode not in ("hf", "openai"):
            raise ValueError(f"--tokenizer-mode must be hf or openai, got {self.tokenizer_mode!r}")
        if self.lm_average not in ("token", "sequence"):
            raise ValueError(f"--lm-average must be token or sequence, got {self.lm_average!r}")
        if self.n_transfer is not None:
            if isinstance(self.n_transfer, bool) or not isinstance(self.n_transfer, int) or self.n_transfer < 0:
                raise ValueError(f"--n-transfer must be an integer >= 0, got {self.n_transfer!r}")
            if self.init == "none":
                raise ValueError("--n-transfer needs --init RUN_DIR: with --init none no layer is pretrained")


# ---- command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m engine.finetune",
        description="Fine-tune GPT-1 on a task with the paper's input transformations and auxiliary LM loss.",
    )
    cli.add_dataclass_args(p, FinetuneConfig)
    g = p.add_argument_group("run")
    g.add_argument(
        "--out", default=None, help="run directory (default: runs/finetune-<task>; with --eval-only: <init>/eval)"
    )
    g.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate the fine-tuned run --init on the dev (and test) files, no training",
    )
    g.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR with its saved settings, tokenizer and kernels",
    )
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    g.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="checkpoint and exit after update STEP "
        "without changing the schedule (split a run into sessions; continue with --resume)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    cli.add_dataclass_args(
        p,
        TrainConfig,
        defaults={**PAPER_TRAIN, "max_steps": None, "eval_every": None, "checkpoint_every": None, "warmup_steps": None},
        helps={
            "max_steps": "updates in the run; overrides --epochs (default: epochs × ceil(n_train / batch size))",
            "batch_size": "examples per update, over all processes and accumulation steps (paper: 32)",
            "lr": f"peak learning rate (default: {PAPER_TRAIN['lr']}, the paper's, on CUDA; {CPU_LR} on CPU, "
            "whose default model is 4 x 256: see CPU_LR)",
            "warmup_steps": "updates of linear warm-up (default: --warmup-fraction of the updates, at least 1)",
            "eval_every": "evaluate on dev (and keep the best checkpoint) every N updates (default: once per epoch)",
            "checkpoint_every": "checkpoint every N updates (default: once per epoch)",
            "schedule": "decay after warm-up (paper, fine-tuning: linear)",
        },
        skip=("out",),
    )
    return p


@dataclass
class Resolved:
    """What a command line resolves to: the configs (train is None for a new run until the
    training set's size is known), the run directory, and a resumed run's model config."""

    finetune: FinetuneConfig
    train: TrainConfig | None
    given_train: dict[str, Any]
    out: Path
    saved_model: dict[str, Any] | None = None

    @property
    def device(self) -> str:
        return self.train.device if self.train else self.given_train.get("device", "auto")

    @property
    def fused(self) -> bool:
        return self.train.fused if self.train else self.given_train.get("fused", True)

    @property
    def seed(self) -> int:
        return self.train.seed if self.train else self.given_train.get("seed", 0)


def resolve(ns: argparse.Namespace) -> Resolved:
    """The run's settings: the flags given (new run) or the saved ones under the one resume
    policy (engine.training.run.resume_sections)."""
    given_f, given_t = cli.dataclass_kwargs(FinetuneConfig, ns), cli.dataclass_kwargs(TrainConfig, ns)
    if ns.stop_at is not None and ns.stop_at <= 0:
        raise ValueError(f"--stop-at must be a positive update number, got {ns.stop_at}")
    if not ns.resume:
        fcfg = FinetuneConfig(**given_f)
        return Resolved(fcfg, None, given_t, Path(ns.out or f"runs/finetune-{fcfg.task}"))
    out = Path(ns.resume)
    if ns.out and Path(ns.out) != out:
        raise cli.UserError(f"--out {ns.out} differs from --resume {out}; a resumed run stays in its directory")
    if ns.overwrite:
        raise cli.UserError("--resume and --overwrite contradict each other; pass one")
    built, saved = run.resume_sections(
        out,
        "finetune",
        {"finetune": given_f, "train": {**given_t, "out": str(out)}},
        {"finetune": FinetuneConfig, "train": TrainConfig},
    )
    return Resolved(built["finetune"], built["train"], given_t, out, saved.get("model"))


def _resolve_train_config(
    fcfg: FinetuneConfig, given: dict[str, Any], out: Path, n_train: int, device: torch.device
) -> TrainConfig:
    kw = {**PAPER_TRAIN, **({"lr": CPU_LR} if device.type == "cpu" else {}), **given, "out": str(out)}
    steps_per_epoch = math.ceil(n_train / kw["batch_size"])
    if "max_steps" not in given:
        kw["max_steps"] = max(1, math.ceil(fcfg.epochs * n_train / kw["batch_size"]))
    if "warmup_steps" not in given:
        kw["warmup_steps"] = max(1, math.ceil(fcfg.warmup_fraction * kw["max_steps"]))
    kw.setdefault("eval_every", min(steps_per_epoch, kw["max_steps"]))
    kw.setdefault("checkpoint_every", min(steps_per_epoch, kw["max_steps"]))
    kw.setdefault("log_every", max(1, min(10, kw["max_steps"] // 10)))
    return TrainConfig(**kw)


# ---- loading models and tokenizers -------------------------------------------------------------


def load_tokenizer(run_dir: Path, override: str | None = None, mode: str = "hf") -> BPETokenizer:
    """tokenizer.json (this engine), vocab.json + merges.txt (Hugging Face openai-gpt), or
    encoder_bpe_40000.json + vocab_40000.bpe (OpenAI's GPT-1 release)."""
    return run.load_tokenizer(run_dir, override, mode)


def _missing_run(path: Path, what: str) -> FileNotFoundError:
    if str(path) == PRETRAIN_DEFAULT_OUT:
        return FileNotFoundError(
            f"no pretrained run at {path} ({what}): make one with `{PRETRAIN_COMMAND}`, "
            f"or pass --init RUN_DIR, or --init none to fine-tune from random weights"
        )
    return FileNotFoundError(f"{what}: {path} is not a run directory (config.json + model.safetensors)")


def load_body(fcfg: FinetuneConfig, fused: bool) -> tuple[GPT1, BPETokenizer, str]:
    """(body with the task tokens added, tokenizer, a description of where it came from)."""
    if fcfg.init == "none":
        config, tokenizer, source = _random_init_source(fcfg)
        body = GPT1(_with_dropout(config, fcfg.dropout), fused=fused)
    else:
        from engine.model.hf import load_pretrained

        init = Path(fcfg.init)
        if not (init / "config.json").is_file():
            raise _missing_run(init, "--init")
        tokenizer = load_tokenizer(init, fcfg.tokenizer, fcfg.tokenizer_mode)
        config, state = load_pretrained(init)
        if tokenizer.vocab_size > config.vocab_size + 4:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but {init} has only {config.vocab_size} embedding rows"
            )
        body = GPT1(_with_dropout(config, fcfg.dropout), fused=fused)
        body.load_state_dict(state)
        source = str(init)
        if fcfg.n_transfer is not None:
            body.reset_blocks(fcfg.n_transfer)
            source += f" (embeddings + {fcfg.n_transfer} of {body.config.n_layer} blocks)"
    add_task_tokens(body, tokenizer)
    return body, tokenizer, source


def _random_init_source(fcfg: FinetuneConfig) -> tuple[GPT1Config, BPETokenizer, str]:
    """--init none: the config of --preset or of --arch's config.json (weights never read),
    the tokenizer of --tokenizer or --arch."""
    arch = Path(fcfg.arch or PRETRAIN_DEFAULT_OUT)
    if fcfg.preset is not None:
        if fcfg.tokenizer is None and fcfg.arch is None:
            raise cli.UserError(
                f"--init none --preset {fcfg.preset} needs a tokenizer: pass --tokenizer PATH "
                "(or --arch RUN to take that run's)"
            )
        tokenizer = load_tokenizer(arch, fcfg.tokenizer, fcfg.tokenizer_mode)
        return (
            GPT1Config.from_name(fcfg.preset, vocab_size=tokenizer.vocab_size),
            tokenizer,
            f"random init ({fcfg.preset})",
        )
    if not (arch / "config.json").is_file():
        raise FileNotFoundError(
            f"--init none takes the model's config.json and tokenizer from --arch RUN ({arch} has no config.json"
            + (f"; `{PRETRAIN_COMMAND}` makes one there" if fcfg.arch is None else "")
            + "), or pass --preset NAME with --tokenizer PATH"
        )
    return (
        GPT1Config.from_json_file(arch / "config.json"),
        load_tokenizer(arch, fcfg.tokenizer, fcfg.tokenizer_mode),
        f"random init ({arch / 'config.json'})",
    )


def _with_dropout(config: GPT1Config, dropout: float | None) -> GPT1Config:
    if dropout is None:
        return config
    return dataclasses.replace(config, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)


def resumed_body(out: Path, saved_model: Any, fused: bool) -> tuple[GPT1, BPETokenizer]:
    """A resumed run's body (weights: the checkpoint's) and its own tokenizer, task tokens included."""
    tokenizer = run.load_tokenizer_file(out / TOKENIZER_FILE)
    tokenizer.special_tokens()
    config = run.build_section(GPT1Config, saved_model, out / checkpoint.RUN_CONFIG, "model")
    return GPT1(config, fused=fused), tokenizer


def make_head(task: Task, body: GPT1, dropout: float) -> TaskHead:
    return TaskHead(
        task.kind, body.config.n_embd, task.n_labels, pdrop=dropout, initializer_range=body.config.initializer_range
    )


def save_head(head: TaskHead, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    atomic_write(path / HEAD_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def load_head(head: TaskHead, path: Path) -> None:
    from safetensors.torch import load_file

    file = path / HEAD_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {HEAD_FILE} in {path}: not a fine-tuned run")
    try:
        state = load_file(str(file), device=str(head.linear.weight.device))
    except Exception as e:  # safetensors' own error type, and OSError for a truncated file
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{file} does not fit the task's head: {str(e).splitlines()[0]}") from None


def _save_weights(model: GPT1ForTask, path: Path) -> None:
    model.body.save_pretrained(path)
    save_head(model.head, path)


def _load_weights(model: GPT1ForTask, path: Path) -> None:
    from engine.model.hf import load_pretrained

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
    tmp = make_temp_dir(path)  # honours the umask, unlike mkdtemp's 0700
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


def input_reports(train_split: Split, dev: list[Split], test: list[Split]) -> dict[str, InputReport]:
    """{"train" / "dev" / "test" (+ " NAME" for a task's named sets): InputReport}."""
    named = [("train", [train_split]), ("dev", dev), ("test", test)]
    return {
        kind if s.name == kind else f"{kind} {s.name}": InputReport.of(s.examples, [e.truncated for e in s.encoded])
        for kind, splits in named
        for s in splits
    }


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batch_fn(train_set: Sequence[Encoded], batch_size: int, seed: int, pad_id: int):
    """engine.training.trainer's batches(step, start, count): the examples of update `step` are the next
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
    model: GPT1ForTask,
    encoded: Sequence[Encoded],
    batch_size: int,
    device: torch.device,
    pad_id: int,
    autocast: torch.dtype | None = None,
    dist: DistEnv | None = None,
) -> tuple[list[Any], float | None]:
    """(prediction per example, mean L3 over the set or None when unlabelled). Examples go in
    batches of similar length; under DDP each process takes every world_size-th batch."""
    dist = dist or DistEnv(device=device)
    order = sorted(range(len(encoded)), key=lambda i: max(len(s) for s in encoded[i].sequences))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    found: dict[int, Any] = {}
    loss_sum, count = 0.0, 0
    try:
        for chunk in chunks[dist.rank :: dist.world_size]:
            batch = to_device(collate([encoded[i] for i in chunk], pad_id).as_dict(), device)
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
    task: Task,
    model: GPT1ForTask,
    dev: list[Split],
    test: list[Split],
    out: Path,
    batch_size: int,
    device: torch.device,
    pad_id: int,
    known: dict[str, dict[str, Any]] | None = None,
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
                result[kind][split.name] = {
                    **scores,
                    "n": len(split.examples),
                    **({"loss": loss} if loss is not None else {}),
                }
                write_predictions(task, split, preds, out / f"{kind}_predictions{suffix}.tsv", with_labels=True)
            else:
                name = task.submission.get(split.name, f"{task.name}{suffix}.tsv")
                write_predictions(task, split, preds, out / "predictions" / name, with_labels=False)
    primary = result["dev"][dev[0].name]
    result.update({k: v for k, v in primary.items() if k in task.metrics})
    return result


# ---- the run ----------------------------------------------------------------------------------------


def _max_len(fcfg: FinetuneConfig, body: GPT1) -> int:
    P = body.config.n_positions
    if fcfg.max_len is not None and fcfg.max_len > P:
        raise ValueError(f"--max-len {fcfg.max_len} exceeds the model's n_positions ({P})")
    return fcfg.max_len or P


def _task_meta(task: Task, fcfg: FinetuneConfig, max_len: int, source: str) -> dict[str, Any]:
    return {
        "task": task.name,
        "kind": task.kind,
        "labels": list(task.labels),
        "metrics": list(task.metrics),
        "max_len": max_len,
        "lm_coef": fcfg.lm_coef,
        "lm_average": fcfg.lm_average,
        "head_dropout": fcfg.head_dropout,
        "init": source,
        "data_dir": str(Path(fcfg.data_dir).resolve()) if fcfg.data_dir else None,
    }


def _print(msg: str, dist: DistEnv | None = None) -> None:
    if dist is None or dist.is_main:
        print(msg, flush=True)


def _summary(task: Task, result: dict[str, Any]) -> str:
    parts = []
    for kind in ("dev", "test"):
        for name, scores in result.get(kind, {}).items():
            shown = ", ".join(f"{m} {scores[m]:.4f}" for m in task.metrics)
            parts.append(f"{kind if name == kind else f'{kind} {name}'}: {shown} (n={scores['n']})")
    return "; ".join(parts)


def plot_panels(task: Task) -> list[tuple[str, list[tuple[str, str]]]]:
    """loss.png's panels: the combined objective with its two parts, and the dev metric."""
    primary = task.metrics[0]
    return [
        (
            "loss (nats)",
            [
                ("loss", "L3 = L2 + λ·L1 (train)"),
                ("task_loss", "task loss L2 (train)"),
                ("lm_loss", "LM loss L1 (train)"),
                ("val_loss", "L3 (dev)"),
            ],
        ),
        (f"dev {primary}", [(f"dev_{primary}", "dev")]),
    ]


def _plot(metrics: Any, path: Path, panels: list[Any]) -> None:
    params = inspect.signature(metrics.plot).parameters.values()
    if any(p.name == "panels" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        metrics.plot(path, panels=panels)
    else:  # engine.training.trainer's plot without panels: its default figure stays
        metrics.plot(path)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.eval_only:
        return eval_only(ns)
    res = resolve(ns)
    with run.distributed(res.device) as dist, run.locked_run_dir(res.out, dist):
        return _finetune(ns, res, dist)


def _finetune(ns: argparse.Namespace, res: Resolved, dist: DistEnv) -> int:
    t0 = time.perf_counter()
    out, fcfg = res.out, res.finetune
    resume_from = checkpoint.prepare_run_dir(out, resume=bool(ns.resume), overwrite=ns.overwrite)
    if resume_from is not None and (done := run.finished_step(resume_from, res.train.max_steps, out / METRICS_FILE)):
        _print(
            f"{out} already finished at update {done} of {res.train.max_steps}: nothing to do, its best dev weights "
            f"and {METRICS_FILE} stay as they are (raise --max-steps to train further)",
            dist,
        )
        return 0
    run.check_fused(res.fused, dist.device)
    task = get_task(fcfg.task)
    torch.manual_seed(res.seed)  # the same new rows, head (and --init none weights) on every rank
    if resume_from is None:
        body, tokenizer, source = load_body(fcfg, res.fused)
    else:
        (body, tokenizer), source = resumed_body(out, res.saved_model, res.fused), fcfg.init
    max_len = _max_len(fcfg, body)
    transform = InputTransform(tokenizer, task.kind, max_len)
    (train_split,) = load_splits(task, Path(fcfg.data_dir) if fcfg.data_dir else None, "train", transform)
    if not train_split.labelled:
        raise ValueError(f"task {task.name!r}: the training set has unlabelled examples")
    dev = load_splits(task, Path(fcfg.data_dir) if fcfg.data_dir else None, "dev", transform)
    test = load_splits(task, Path(fcfg.data_dir) if fcfg.data_dir else None, "test", transform)
    for name, report in input_reports(train_split, dev, test).items():  # what the transformation cut, what is empty
        if dist.is_main and (note := report.note(f"{name.split()[0]} examples", max_len)):
            print(f"note: {name}: {note}", file=sys.stderr, flush=True)
    cfg = res.train or _resolve_train_config(fcfg, res.given_train, out, len(train_split.examples), dist.device)
    memory.check_model(body, cfg, max_len, dist, sequences=len(train_split.encoded[0].sequences))
    # Everything is read and checked: only now is the run directory written.
    if dist.is_main:
        _prepare_out(out, ns.overwrite, resume_from is not None, tokenizer)
        run.save_run_config(out, "finetune", {"finetune": fcfg, "train": cfg, "model": body.config})
    dist.barrier()
    head = make_head(task, body, fcfg.head_dropout)
    if task.kind == "regression":
        head.set_target_stats(torch.tensor([float(e.label) for e in train_split.examples]))
    model = GPT1ForTask(body, head, lm_coef=fcfg.lm_coef, lm_average=fcfg.lm_average)
    _describe(task, train_split, dev + test, source, model, max_len, fcfg, cfg, dist)
    meta = _task_meta(task, fcfg, max_len, source)
    return _train(ns, task, model, tokenizer, train_split, dev, test, cfg, fcfg, meta, source, resume_from, dist, t0)


def _prepare_out(out: Path, overwrite: bool, resuming: bool, tokenizer: BPETokenizer) -> None:
    """--overwrite clears the old run; a new run's tokenizer is saved as part of it; a
    finished run resumed for more updates gets its best-dev weights back into best/."""
    if overwrite:
        checkpoint.clear_run_dir(out)
        for name in (BEST, HEAD_FILE, TASK_FILE, METRICS_FILE, "predictions"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if not resuming:
        tokenizer.save(out / TOKENIZER_FILE)
    elif (out / METRICS_FILE).is_file() and not (out / BEST).is_dir():
        _copy_model(out, out / BEST)


def _copy_model(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (src / name).is_file():
            atomic_write(dst / name, lambda tmp, f=src / name: shutil.copyfile(f, tmp))


def _describe(
    task: Task,
    train_split: "Split",
    others: list["Split"],
    source: str,
    model: GPT1ForTask,
    max_len: int,
    fcfg: FinetuneConfig,
    cfg: TrainConfig,
    dist: DistEnv,
) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    mean_len = _mean_tokens(train_split) / len(train_split.encoded[0].sequences)
    _print(
        f"task {task.name} ({task.kind}): {len(train_split.examples)} train, "
        + ", ".join(f"{len(s.examples)} {s.name}" for s in others)
        + f" | init {source} | {n_params / 1e6:.2f}M parameters, max_len {max_len}, mean sequence {mean_len:.0f} tokens",
        dist,
    )
    _print(f"precision: {resolve_precision(cfg.precision, dist.device)[1]}", dist)
    _print("config: " + json.dumps({"finetune": dataclasses.asdict(fcfg), "train": dataclasses.asdict(cfg)}), dist)


def _mean_tokens(split: "Split") -> float:
    return sum(sum(len(s) for s in e.sequences) for e in split.encoded) / len(split.encoded)


def _train(
    ns: argparse.Namespace,
    task: Task,
    model: GPT1ForTask,
    tokenizer: BPETokenizer,
    train_split: "Split",
    dev: list["Split"],
    test: list["Split"],
    cfg: TrainConfig,
    fcfg: FinetuneConfig,
    meta: dict[str, Any],
    source: str,
    resume_from: Path | None,
    dist: DistEnv,
    t0: float,
) -> int:
    out, sp, primary = Path(cfg.out), tokenizer.special_tokens(), task.metrics[0]
    eval_bs = fcfg.eval_batch_size or cfg.batch_size
    best = {"score": -math.inf, "step": 0}
    best_dev: dict[str, Any] = {}  # the best checkpoint's predictions on the first dev set (this process's run)

    def evaluate(trainer: train.Trainer) -> dict[str, float]:
        preds, loss = predict(
            trainer.model, dev[0].encoded, eval_bs, trainer.device, sp.pad, trainer.autocast, trainer.dist
        )
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

    n_params, mean_tokens = sum(p.numel() for p in model.parameters()), _mean_tokens(train_split)
    mean_len = mean_tokens / len(train_split.encoded[0].sequences)
    trainer = train.Trainer(
        model,
        cfg,
        loss_fn,
        batch_fn(train_split.encoded, cfg.batch_size, cfg.seed, sp.pad),
        evaluate=evaluate,
        dist=dist,
        tokens_per_sample=round(mean_tokens),
        flops_per_token=flops_per_token(n_params, model.body.config.n_layer, model.body.config.n_embd, round(mean_len)),
        weights=TASK_WEIGHTS,
        extra_state=lambda: dict(best),
        load_extra_state=lambda s: best.update(s),
        resume_from=resume_from,
        progress=not ns.quiet,
    )
    result = trainer.fit(stop_at=ns.stop_at)
    code = run.exit_code(result, out, lambda m: _print(m, dist))
    if code is not None or not dist.is_main:
        return code or 0
    _plot(trainer.metrics, out / checkpoint.LOSS_PLOT, plot_panels(task))
    # The run directory gets the best dev checkpoint (the trainer left the final weights there).
    if (out / BEST).is_dir():
        install_run(out / BEST, out)
        shutil.rmtree(out / BEST, ignore_errors=True)
    _load_weights(model, out)
    res = evaluate_all(
        task, model, dev, test, out, eval_bs, trainer.device, sp.pad, known={dev[0].name: best_dev} if best_dev else {}
    )
    metrics = {
        "task": task.name,
        **{k: res[k] for k in task.metrics},
        "n_train": len(train_split.examples),
        "n_dev": len(dev[0].examples),
        "best_step": best["step"],
        "steps": result.step,
        "init": source,
        "dev": res["dev"],
        "test": res["test"],
        "inputs": {k: r.as_dict() for k, r in input_reports(train_split, dev, test).items()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    print(
        f"{_summary(task, res)} | best at update {best['step']} of {result.step} | "
        f"{metrics['wall_s']:.0f}s | run directory {out}",
        flush=True,
    )
    return 0


def eval_only(ns: argparse.Namespace) -> int:
    """Re-evaluates the fine-tuned run --init on its task's dev (and test) files."""
    given = cli.dataclass_kwargs(FinetuneConfig, ns)
    fcfg = FinetuneConfig(**given)
    run_dir = Path(fcfg.init)
    if fcfg.init == "none" or not (run_dir / TASK_FILE).is_file():
        raise FileNotFoundError(
            f"--eval-only needs --init RUN_DIR of a fine-tuned run ({TASK_FILE} + {HEAD_FILE}); {run_dir} has no {TASK_FILE}"
        )
    meta = _read_task_meta(run_dir / TASK_FILE)
    task = get_task(meta.get("task"))
    if "task" in given and given["task"] != task.name:
        raise ValueError(f"{run_dir} was fine-tuned on {task.name!r}, not {given['task']!r}")
    data_dir = Path(fcfg.data_dir) if fcfg.data_dir else (Path(meta["data_dir"]) if meta.get("data_dir") else None)
    out = Path(ns.out) if ns.out else run_dir / "eval"
    device = resolve_device(vars(ns).get("device", "auto"))
    fused = vars(ns).get("fused", True)
    run.check_fused(fused, device)
    body = GPT1.from_pretrained(run_dir, fused=fused)
    tokenizer = load_tokenizer(run_dir, fcfg.tokenizer)
    tokenizer.special_tokens()  # a fine-tuned run's tokenizer has them
    head = make_head(task, body, meta.get("head_dropout", meta.get("dropout", 0.1)))
    load_head(head, run_dir)
    model = GPT1ForTask(body, head, lm_coef=meta.get("lm_coef", 0.5), lm_average=meta.get("lm_average", "token")).to(
        device
    )
    transform = InputTransform(tokenizer, task.kind, int(meta.get("max_len", body.config.n_positions)))
    dev = load_splits(task, data_dir, "dev", transform)
    test = load_splits(task, data_dir, "test", transform)
    out.mkdir(parents=True, exist_ok=True)
    bs = fcfg.eval_batch_size or vars(ns).get("batch_size", PAPER_TRAIN["batch_size"])
    res = evaluate_all(task, model, dev, test, out, bs, device, tokenizer.special_tokens().pad)
    metrics = {
        "task": task.name,
        **{k: res[k] for k in task.metrics},
        "n_dev": len(dev[0].examples),
        "run": str(run_dir),
        "dev": res["dev"],
        "test": res["test"],
    }
    atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    print(f"{_summary(task, res)} | {out / METRICS_FILE}", flush=True)
    return 0


def _read_task_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("task"), str):
        raise ValueError(f'{path}: expected a JSON object with a "task" name')
    return meta


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
