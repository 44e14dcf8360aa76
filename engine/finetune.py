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
model is a 4-layer one, lr 1e-4 (CPU_LR). This file is the Finetuning recipe; the run's
lifecycle (lock, saved config, resume policy, exit codes) is engine.training.launch's, the
scoring engine.inference.tasks' (also --eval-only's).

The run directory (--out) ends up holding the best dev checkpoint (engine.model.finetuned:
config.json + model.safetensors, head.safetensors, tokenizer.json, task.json); metrics.json
(final dev metrics of that checkpoint, n_train, n_dev); dev predictions; GLUE-format
predictions for unlabelled test files; and the trainer's train_config.json, metrics.jsonl,
loss.png (L3, task and LM loss; the dev metric) and checkpoints/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import cli
from engine.data.splits import ExampleBatches, load_splits
from engine.data.tasks import DEFAULT_TASK, TASKS, Task, get_task
from engine.data.transforms import InputReport, InputTransform
from engine.fileio import atomic_write_text
from engine.inference.tasks import METRICS_FILE, RunEvaluation, Scorer, summary
from engine.model.config import GPT1Config
from engine.model.finetuned import (
    HEAD_FILE,
    TASK_FILE,
    TaskMeta,
    copy_finetuned,
    load_weights,
    save_finetuned,
    save_weights,
)
from engine.model.gpt1 import GPT1, load_pretrained
from engine.model.heads import GPT1ForTask, TaskHead, add_task_tokens
from engine.model.tokenizer import BPETokenizer, load_tokenizer
from engine.training import memory
from engine.training.checkpoint import LOSS_PLOT, RUN_CONFIG, WeightsIO
from engine.training.config import TrainConfig
from engine.training.flops import flops_per_token
from engine.training.launch import Recipe, Run, RunArgs, add_run_args, launch, model_row
from engine.training.run import build_section, own_tokenizer, resume_sections
from engine.training.trainer import Job, Trainer, TrainResult

# Where `python -m engine.pretrain` writes its run when given no --out.
PRETRAIN_DEFAULT_OUT = "runs/pretrain"
PRETRAIN_COMMAND = "python -m engine.pretrain --fused"
BEST = "best"  # the best dev checkpoint while training; moved into the run directory at the end
WARMUP_FRACTION = 0.002  # the paper: warm-up over 0.2% of training
# The paper's fine-tuning optimisation (§4.1), written once: --help shows it, runs use it.
PAPER_TRAIN: dict[str, Any] = {"batch_size": 32, "lr": 6.25e-5, "schedule": "linear"}
# On CPU the default model is pretraining's small CPU one, which takes a larger rate than the
# paper's 117M model (measured: bench/results/cpu-defaults.md).
CPU_LR = 1e-4
# Checkpoints hold the body in the Hugging Face layout + head.safetensors.
TASK_WEIGHTS = WeightsIO(save_weights, load_weights)


# ---- configuration --------------------------------------------------------------------------


@dataclass
class FinetuneConfig:
    """Task, model and fine-tuning (the paper's defaults)."""

    task: str = field(default=DEFAULT_TASK, metadata={"help": f"task name: {', '.join(TASKS)}"})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": (
                "directory holding the task's files in their published layout (e.g. glue_data/RTE); embedded tasks "
                "need none (given, it replaces the packaged plays) (default: none)"
            )
        },
    )
    init: str = field(
        default=PRETRAIN_DEFAULT_OUT,
        metadata={
            "help": (
                f"run directory to start from (config.json + model.safetensors + tokenizer), or 'none' for random "
                f"weights; with --eval-only, the fine-tuned run (default: {PRETRAIN_DEFAULT_OUT}, where "
                f"`{PRETRAIN_COMMAND}` writes)"
            )
        },
    )
    arch: str | None = field(
        default=None,
        metadata={
            "help": (
                f"with --init none: a run whose config.json and tokenizer (never its weights) the random model takes,"
                f" so the ablation differs from pretraining in the weights only (default: {PRETRAIN_DEFAULT_OUT} "
                f"unless --preset is given)"
            )
        },
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": (
                "with --init none: a GPT1Config preset (gpt1, gpt1-medium, gpt1-small, gpt1-tiny) instead of --arch's"
                " config; needs --tokenizer or --arch for the tokenizer (default: none)"
            )
        },
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "a tokenizer.json to use instead of the run's (default: the run's own)"}
    )
    tokenizer_mode: str = field(
        default="hf",
        metadata={
            "help": (
                "how text is cut into words when --init holds GPT-1's original vocabulary files "
                "(encoder_bpe_40000.json + vocab_40000.bpe, or vocab.json + merges.txt): hf (transformers) or openai "
                "(OpenAI's TextEncoder: ftfy + spaCy, pip install -e '.[openai]'); a tokenizer.json keeps its own"
            ),
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
            "help": (
                "transfer the embeddings and the first K blocks from --init and initialise the rest afresh (the "
                "paper's §5 layers-transferred ablation) (default: all)"
            )
        },
    )
    head_dropout: float = field(
        default=0.1, metadata={"help": "dropout before the task head's linear layer (paper: 0.1)"}
    )
    dropout: float | None = field(
        default=None,
        metadata={
            "help": (
                "the model's residual, embedding and attention dropout (default: the model's config, 0.1 as the paper)"
            )
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
    g = add_run_args(p, "run directory (default: runs/finetune-<task>; with --eval-only: <init>/eval)")
    g.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate the fine-tuned run --init on the dev (and test) files, no training",
    )
    cli.add_dataclass_args(
        p,
        TrainConfig,
        defaults={**PAPER_TRAIN, "max_steps": None, "eval_every": None, "checkpoint_every": None, "warmup_steps": None},
        helps={
            "max_steps": "updates in the run; overrides --epochs (default: epochs × ceil(n_train / batch size))",
            "batch_size": "examples per update, over all processes and accumulation steps (paper: 32)",
            "lr": f"peak learning rate (default: {PAPER_TRAIN['lr']}, the paper's, on CUDA; {CPU_LR} on CPU, "
            "whose default model is 4 x 256: bench/results/cpu-defaults.md)",
            "warmup_steps": "updates of linear warm-up (default: --warmup-fraction of the updates, at least 1)",
            "eval_every": "evaluate on dev (and keep the best checkpoint) every N updates (default: once per epoch)",
            "checkpoint_every": "checkpoint every N updates (default: once per epoch)",
            "schedule": "decay after warm-up (paper, fine-tuning: linear)",
        },
        skip=("out",),
    )
    return p


def default_out(task: str) -> str:
    """Where a fine-tuning run lives when given no --out."""
    return f"runs/finetune-{task}"


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    given, given_train = cli.dataclass_kwargs(FinetuneConfig, ns), cli.dataclass_kwargs(TrainConfig, ns)
    if ns.eval_only:
        return eval_only(given, given_train, ns.out)
    args = RunArgs(**cli.dataclass_kwargs(RunArgs, ns)).restarted(default_out(given.get("task", DEFAULT_TASK)))
    return launch(Finetuning.resolve(given, given_train, args), args)


def eval_only(given: dict[str, Any], given_train: dict[str, Any], out: str | None) -> int:
    """--eval-only: the fine-tuned run --init re-scored on its task's dev (and test) files
    (engine.inference.tasks.RunEvaluation), no training."""
    fcfg = FinetuneConfig(**given)
    run_dir = Path(fcfg.init)
    if fcfg.init == "none" or not (run_dir / TASK_FILE).is_file():
        raise FileNotFoundError(
            f"--eval-only needs --init RUN_DIR of a fine-tuned run ({TASK_FILE} + {HEAD_FILE}); "
            f"{run_dir} has no {TASK_FILE}"
        )
    evaluation = RunEvaluation(
        run_dir,
        Path(out) if out else run_dir / "eval",
        data_dir=Path(fcfg.data_dir) if fcfg.data_dir else None,
        task=given.get("task"),
        tokenizer=fcfg.tokenizer,
        batch_size=fcfg.eval_batch_size or given_train.get("batch_size", PAPER_TRAIN["batch_size"]),
        device=given_train.get("device", "auto"),
        fused=given_train.get("fused", True),
    )
    print(evaluation(), flush=True)
    return 0


# ---- the recipe -------------------------------------------------------------------------------------


class Finetuning(Recipe):
    """A task on a pretrained body (the paper's §3.2–3.3): its data (the task's splits through
    the input transformation), model (body + head), loss L3, dev evaluation keeping the best
    checkpoint, and final report (metrics.json, predictions), for engine.training.launch."""

    kind, title, done_file = "finetune", "GPT-1 fine-tuning", METRICS_FILE
    finished_note = f", its best dev weights and {METRICS_FILE} stay as they are"
    own_files = (BEST, HEAD_FILE, TASK_FILE, METRICS_FILE, "predictions")

    def __init__(
        self,
        config: FinetuneConfig,
        train: TrainConfig | None,
        given_train: dict[str, Any],
        out: Path,
        saved_model: dict[str, Any] | None = None,
    ) -> None:
        """`train` is None for a new run until build() knows the training set's size."""
        self.config, self.train, self.given_train, self.out = config, train, given_train, out
        self.saved_model = saved_model  # a resumed run's model config (train_config.json's "model")
        self.best: dict[str, Any] = {"score": -math.inf, "step": 0}  # checkpointed with the run
        self.best_dev: dict[str, Any] = {}  # this process's predictions of the best checkpoint on dev

    @classmethod
    def resolve(cls, given: dict[str, Any], given_train: dict[str, Any], args: RunArgs) -> Finetuning:
        """The run's settings: the flags given (new run) or the saved ones under the one
        resume policy (engine.training.run.resume_sections)."""
        if args.resume_dir is None:
            config = FinetuneConfig(**given)
            return cls(config, None, given_train, args.run_dir(default_out(config.task)))
        out = args.resume_dir
        built, saved = resume_sections(
            out,
            cls.kind,
            {"finetune": given, "train": {**given_train, "out": str(out)}},
            {"finetune": FinetuneConfig, "train": TrainConfig},
        )
        return cls(built["finetune"], built["train"], given_train, out, saved.get("model"))

    @property
    def device(self) -> str:
        return self.train.device if self.train else self.given_train.get("device", "auto")

    @property
    def fused(self) -> bool:
        return self.train.fused if self.train else self.given_train.get("fused", True)

    @property
    def seed(self) -> int:
        return self.train.seed if self.train else self.given_train.get("seed", 0)

    # ---- data and model ------------------------------------------------------------------------

    def build(self, run: Run) -> None:
        self.t0 = time.perf_counter()
        fcfg, self.task = self.config, get_task(self.config.task)
        torch.manual_seed(self.seed)  # the same new rows, head (and --init none weights) on every rank
        body = self._resumed_body(run.out) if run.resume_from is not None else self._new_body()
        if fcfg.max_len is not None and fcfg.max_len > body.config.n_positions:
            raise ValueError(f"--max-len {fcfg.max_len} exceeds the model's n_positions ({body.config.n_positions})")
        self.max_len = fcfg.max_len or body.config.n_positions
        self._data()
        for name, report in self.input_reports().items():  # what the transformation cut, what is empty
            if run.dist.is_main and (note := report.note(f"{name.split()[0]} examples", self.max_len)):
                print(f"note: {name}: {note}", file=sys.stderr, flush=True)
        n_train = len(self.train_split.examples)
        self.train = self.train or _resolve_train_config(fcfg, self.given_train, run.out, n_train, run.dist.device)
        head = TaskHead(
            self.task.kind, body.config.n_embd, self.task.n_labels, fcfg.head_dropout, body.config.initializer_range
        )
        if self.task.kind == "regression":
            head.set_target_stats(torch.tensor([float(e.label) for e in self.train_split.examples]))
        self.model = GPT1ForTask(body, head, lm_coef=fcfg.lm_coef, lm_average=fcfg.lm_average)

    def _data(self) -> None:
        """The task's train, dev and test sets through the input transformation."""
        transform = InputTransform(self.tokenizer, self.task.kind, self.max_len)
        data_dir = Path(self.config.data_dir) if self.config.data_dir else None
        (self.train_split,) = load_splits(self.task, data_dir, "train", transform)
        if not self.train_split.labelled:
            raise ValueError(f"task {self.task.name!r}: the training set has unlabelled examples")
        self.dev = load_splits(self.task, data_dir, "dev", transform)
        self.test = load_splits(self.task, data_dir, "test", transform)

    def input_reports(self) -> dict[str, InputReport]:
        """{"train" / "dev" / "test" (+ " NAME" for a task's named sets): what the input transformation
        cut and which examples are empty}."""
        named = [("train", [self.train_split]), ("dev", self.dev), ("test", self.test)]
        return {
            kind if s.name == kind else f"{kind} {s.name}": InputReport.of(s.examples, [e.truncated for e in s.encoded])
            for kind, splits in named
            for s in splits
        }

    def check_memory(self, run: Run) -> None:
        sequences = len(self.train_split.encoded[0].sequences)  # both orders of a pair, one per choice
        memory.check_model(self.model.body, self.train, self.max_len, run.dist, sequences)

    def _new_body(self) -> GPT1:
        """--init's body (all or --n-transfer of its blocks) or a random one, with its
        tokenizer, the task tokens added."""
        fcfg = self.config
        if fcfg.init == "none":
            config, self.tokenizer, self.source = self._random_init_source()
            body = GPT1(_with_dropout(config, fcfg.dropout), fused=self.fused)
        else:
            init = Path(fcfg.init)
            if not (init / "config.json").is_file():
                raise _missing_run(init, "--init")
            self.tokenizer = self._tokenizer(init)
            config, state = load_pretrained(init)
            if self.tokenizer.vocab_size > config.vocab_size + 4:
                raise ValueError(
                    f"the tokenizer has {self.tokenizer.vocab_size} tokens but {init} has only "
                    f"{config.vocab_size} embedding rows"
                )
            body = GPT1(_with_dropout(config, fcfg.dropout), fused=self.fused)
            body.load_state_dict(state)
            self.source = str(init)
            if fcfg.n_transfer is not None:
                body.reset_blocks(fcfg.n_transfer)
                self.source += f" (embeddings + {fcfg.n_transfer} of {body.config.n_layer} blocks)"
        add_task_tokens(body, self.tokenizer)
        return body

    def _tokenizer(self, run_dir: Path) -> BPETokenizer:
        """--tokenizer's, else `run_dir`'s own."""
        fcfg = self.config
        if fcfg.tokenizer is not None:
            return load_tokenizer(fcfg.tokenizer, fcfg.tokenizer_mode, "--tokenizer")
        return load_tokenizer(run_dir, fcfg.tokenizer_mode)

    def _random_init_source(self) -> tuple[GPT1Config, BPETokenizer, str]:
        """--init none: the config of --preset or of --arch's config.json (weights never read),
        the tokenizer of --tokenizer or --arch."""
        fcfg = self.config
        arch = Path(fcfg.arch or PRETRAIN_DEFAULT_OUT)
        if fcfg.preset is not None:
            if fcfg.tokenizer is None and fcfg.arch is None:
                raise cli.UserError(
                    f"--init none --preset {fcfg.preset} needs a tokenizer: pass --tokenizer PATH "
                    "(or --arch RUN to take that run's)"
                )
            tokenizer = self._tokenizer(arch)
            config = GPT1Config.from_name(fcfg.preset, vocab_size=tokenizer.vocab_size)
            return config, tokenizer, f"random init ({fcfg.preset})"
        if not (arch / "config.json").is_file():
            raise FileNotFoundError(
                f"--init none takes the model's config.json and tokenizer from --arch RUN ({arch} has no config.json"
                + (f"; `{PRETRAIN_COMMAND}` makes one there" if fcfg.arch is None else "")
                + "), or pass --preset NAME with --tokenizer PATH"
            )
        config = GPT1Config.from_json_file(arch / "config.json")
        return config, self._tokenizer(arch), f"random init ({arch / 'config.json'})"

    def _resumed_body(self, out: Path) -> GPT1:
        """A resumed run's body (its weights come from the checkpoint) and its own tokenizer."""
        self.tokenizer, self.source = own_tokenizer(out), self.config.init
        self.tokenizer.special_tokens()  # a fine-tuning run's tokenizer has them
        config = build_section(GPT1Config, self.saved_model, out / RUN_CONFIG, "model")
        return GPT1(config, fused=self.fused)

    def write_run_dir(self, run: Run) -> None:
        """A finished run resumed for more updates gets its best-dev weights back into best/."""
        if run.resume_from is not None and (run.out / METRICS_FILE).is_file() and not (run.out / BEST).is_dir():
            copy_finetuned(run.out, run.out / BEST)

    def sections(self) -> dict[str, Any]:
        return {"finetune": self.config, "train": self.train, "model": self.model.body.config}

    def describe(self, run: Run) -> list[tuple[str, str]]:
        split = self.train_split
        sets = ", ".join(f"{len(s.examples)} {s.name}" for s in self.dev + self.test)
        return [
            model_row(self.model.body.config, _n_params(self.model), self.source),
            (
                "task",
                f"{self.task.name} ({self.task.kind}): {len(split.examples)} train, {sets}; "
                f"max_len {self.max_len}, mean sequence {self._mean_sequence:.0f} tokens",
            ),
        ]

    @property
    def _mean_sequence(self) -> float:
        return self.train_split.mean_tokens / len(self.train_split.encoded[0].sequences)

    # ---- training --------------------------------------------------------------------------------

    def job(self, run: Run) -> Job:
        cfg, body = self.train, self.model.body.config
        flops = flops_per_token(_n_params(self.model), body.n_layer, body.n_embd, round(self._mean_sequence))
        return Job(
            self.loss,
            ExampleBatches(self.train_split.encoded, cfg.batch_size, cfg.seed, self.tokenizer.special_tokens().pad),
            evaluate=self.evaluate,
            tokens_per_sample=round(self.train_split.mean_tokens),
            flops_per_token=flops,
            weights=TASK_WEIGHTS,
            extra_state=lambda: dict(self.best),
            load_extra_state=self.best.update,
        )

    @staticmethod
    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """L3, with L2 and L1 logged beside it."""
        o = model(**batch)
        extra = {"task_loss": o.task_loss.item()}
        if o.lm_loss is not None:
            extra["lm_loss"] = o.lm_loss.item()
        return o.loss, extra

    def scorer(self, trainer: Trainer) -> Scorer:
        pad, batch_size = self.tokenizer.special_tokens().pad, self.config.eval_batch_size or self.train.batch_size
        return Scorer(self.task, self.model, pad, batch_size, trainer.autocast, trainer.dist)

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """The first dev set's L3 and metrics; a new best saves the run's best checkpoint."""
        scorer, dev = self.scorer(trainer), self.dev[0]
        preds, loss = scorer.predict(dev.encoded)
        scores = scorer.score(dev, preds)
        primary = self.task.metrics[0]
        if scores[primary] > self.best["score"]:
            self.best.update(score=scores[primary], step=trainer.step)
            self.best_dev.update(preds=preds, loss=loss)
            if trainer.dist.is_main:
                meta = dataclasses.replace(self._meta(), step=trainer.step, dev=scores)
                save_finetuned(self.model, self.tokenizer, meta, self.out / BEST)
            trainer.dist.barrier()
        return {"val_loss": loss, **{f"dev_{k}": v for k, v in scores.items()}}

    def _meta(self) -> TaskMeta:
        fcfg, task = self.config, self.task
        return TaskMeta(
            task.name,
            task.kind,
            list(task.labels),
            self.max_len,
            metrics=list(task.metrics),
            lm_coef=fcfg.lm_coef,
            lm_average=fcfg.lm_average,
            head_dropout=fcfg.head_dropout,
            init=self.source,
            data_dir=str(Path(fcfg.data_dir).resolve()) if fcfg.data_dir else None,
        )

    def finish(self, trainer: Trainer, result: TrainResult, seconds: float) -> int:
        """Rank 0: the best dev checkpoint becomes the run's weights, scored on every dev and
        test set (metrics.json, predictions)."""
        if not trainer.dist.is_main:
            return 0
        out, task = self.out, self.task
        trainer.metrics.plot(out / LOSS_PLOT, panels=plot_panels(task))
        if (out / BEST).is_dir():  # the trainer left the final weights in the run directory
            copy_finetuned(out / BEST, out)
            shutil.rmtree(out / BEST, ignore_errors=True)
        load_weights(self.model, out)
        known = {self.dev[0].name: self.best_dev} if self.best_dev else {}
        scorer = dataclasses.replace(self.scorer(trainer), autocast=None, dist=None)  # rank 0 alone, in fp32
        res = scorer.report(self.dev, self.test, out, known)
        metrics = {
            "task": task.name,
            **{k: res[k] for k in task.metrics},
            "n_train": len(self.train_split.examples),
            "n_dev": len(self.dev[0].examples),
            "best_step": self.best["step"],
            "steps": result.step,
            "init": self.source,
            "dev": res["dev"],
            "test": res["test"],
            "inputs": {k: r.as_dict() for k, r in self.input_reports().items()},
            "wall_s": round(time.perf_counter() - self.t0, 1),
        }
        atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        print(
            f"{summary(task, res)} | best at update {self.best['step']} of {result.step} | "
            f"{metrics['wall_s']:.0f}s | run directory {out}",
            flush=True,
        )
        return 0


def plot_panels(task: Task) -> list[tuple[str, list[tuple[str, str]]]]:
    """loss.png's panels: the combined objective with its two parts, and the dev metric."""
    primary = task.metrics[0]
    losses = [
        ("loss", "L3 = L2 + λ·L1 (train)"),
        ("task_loss", "task loss L2 (train)"),
        ("lm_loss", "LM loss L1 (train)"),
        ("val_loss", "L3 (dev)"),
    ]
    return [("loss (nats)", losses), (f"dev {primary}", [(f"dev_{primary}", "dev")])]


def _resolve_train_config(
    fcfg: FinetuneConfig, given: dict[str, Any], out: Path, n_train: int, device: torch.device
) -> TrainConfig:
    """A new run's TrainConfig: the paper's, CPU_LR on a CPU, lengths from the training set's size."""
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


def _missing_run(path: Path, what: str) -> FileNotFoundError:
    if str(path) == PRETRAIN_DEFAULT_OUT:
        return FileNotFoundError(
            f"no pretrained run at {path} ({what}): make one with `{PRETRAIN_COMMAND}`, "
            f"or pass --init RUN_DIR, or --init none to fine-tune from random weights"
        )
    return FileNotFoundError(f"{what}: {path} is not a run directory (config.json + model.safetensors)")


def _with_dropout(config: GPT1Config, dropout: float | None) -> GPT1Config:
    if dropout is None:
        return config
    return dataclasses.replace(config, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
