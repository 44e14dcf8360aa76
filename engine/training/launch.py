"""The one run skeleton of the training programs: parse once → build a recipe → launch.

    args = RunArgs(out="runs/x")
    recipe = Pretraining.resolve({}, {"max_steps": 100}, args)     # engine.pretrain
    sys.exit(launch(recipe, args))

`launch` owns a run's lifecycle, in this order: join the torchrun job, lock the run directory,
check it against --resume / --overwrite, leave a finished run as it is, check the fused
kernels, let the recipe build its data and model (every input checked), write the run
directory (only now), print the header, train (engine.training.trainer), and turn the result
into an exit code (0 done, 1 diverged, 128 + signal when interrupted; bad input and
environment faults: engine.cli.run_cli). A Recipe supplies only what differs between
pretraining and fine-tuning: data, model, loss, evaluation and the final report.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.cli import UserError
from engine.model.config import GPT1Config
from engine.model.tokenizer import BPETokenizer
from engine.training import elastic
from engine.training.checkpoint import clear_run_dir, prepare_run_dir
from engine.training.config import TrainConfig
from engine.training.distributed import DistEnv, batch_layout, joined
from engine.training.run import check_fused, finished_step, locked_run_dir, save_run_config
from engine.training.trainer import Job, Trainer, TrainResult


@dataclass(frozen=True)
class RunArgs:
    """How a run is run, never what it computes: the `run` flags both training programs share."""

    out: str | None = None  # the run directory (default: the recipe's)
    resume: str | None = None  # continue the run in this directory
    overwrite: bool = False  # replace the run already in `out`
    stop_at: int | None = None  # checkpoint and exit after this update
    quiet: bool = False  # no progress bar

    def __post_init__(self) -> None:
        if self.stop_at is not None and self.stop_at <= 0:
            raise ValueError(f"--stop-at must be a positive update number, got {self.stop_at}")
        if self.resume and self.out and Path(self.out) != Path(self.resume):
            raise UserError(
                f"--out {self.out} differs from --resume {self.resume}; a resumed run stays in its directory"
            )

    @property
    def resume_dir(self) -> Path | None:
        """The run directory this run continues (its saved settings apply), or None for a new run."""
        return Path(self.resume) if self.resume else None

    def run_dir(self, default: str) -> Path:
        """Where the run lives: --resume's directory, else --out, else the recipe's default."""
        return self.resume_dir or Path(self.out or default)

    def restarted(self, default_out: str) -> RunArgs:
        """These flags, or in a round torchrun restarted (engine.training.elastic) the ones that
        continue this job's run in its directory, as --resume would."""
        flags = elastic.restart_flags(self.run_dir(default_out))
        return dataclasses.replace(self, **flags) if flags else self


def add_run_args(parser: argparse.ArgumentParser, out_help: str) -> argparse._ArgumentGroup:
    """The `run` group (RunArgs' flags); returns it for a program's own run flags."""
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=None, metavar="DIR", help=out_help)
    g.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its latest checkpoint (its saved settings, tokenizer and kernels apply)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    g.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="checkpoint and exit after update STEP without changing the schedule (continue with --resume)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return g


@dataclass
class Run:
    """One launched run, as its recipe sees it."""

    args: RunArgs
    dist: DistEnv
    out: Path
    resume_from: Path | None  # the checkpoint this run continues; None for a new run

    def say(self, *lines: str) -> None:
        """Prints on rank 0 only: every process runs the same code, the job prints once."""
        if self.dist.is_main:
            for line in lines:
                print(line, flush=True)


class Recipe(abc.ABC):
    """What a training program supplies to `launch`. Set by the program before launch: `out`
    and, except for a fine-tuning run whose length depends on its data, `train`; by build():
    `tokenizer`, `model` and the final `train`."""

    kind: str  # the program (engine.<kind>) and train_config.json's "kind"
    title: str  # the header's first line
    done_file: str  # the last file a finished run writes: resuming it at max_steps does nothing
    finished_note: str = ""  # what else a finished run keeps as it is, said when resumed
    own_files: tuple[str, ...] = ()  # the recipe's own files in the run directory (--overwrite removes them)

    out: Path
    train: TrainConfig | None
    tokenizer: BPETokenizer
    model: torch.nn.Module

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """--device as resolved before build()."""

    @property
    @abc.abstractmethod
    def fused(self) -> bool:
        """--fused as resolved before build()."""

    @abc.abstractmethod
    def build(self, run: Run) -> None:
        """Data and model, every input checked, nothing written; settles `train`."""

    @abc.abstractmethod
    def sections(self) -> dict[str, Any]:
        """train_config.json's sections (configs by name)."""

    def write_run_dir(self, run: Run) -> None:
        """Rank 0, after the tokenizer and before train_config.json: the recipe's own files."""

    @abc.abstractmethod
    def describe(self, run: Run) -> list[tuple[str, str]]:
        """The header's rows about the model and the data: (name, text)."""

    @abc.abstractmethod
    def check_memory(self, run: Run) -> None:
        """Every rank, after build() and before anything is written: refuse, in one line, a training
        step beyond the device's memory (engine.training.memory.check_model with the sample's shape)."""

    @abc.abstractmethod
    def job(self, run: Run) -> Job:
        """The loss, the batches and the evaluation the Trainer runs."""

    @abc.abstractmethod
    def finish(self, trainer: Trainer, result: TrainResult, seconds: float) -> int:
        """After a run that reached max_steps (`seconds` in fit): the final evaluation and
        report; returns the exit code."""


def launch(recipe: Recipe, args: RunArgs) -> int:
    """Runs `recipe` under `args` (see the module doc); returns the exit code."""
    with joined(recipe.device) as dist, locked_run_dir(recipe.out, dist):
        resume_from = prepare_run_dir(recipe.out, resume=args.resume_dir is not None, overwrite=args.overwrite)
        return _launch(recipe, Run(args, dist, recipe.out, resume_from))


def _launch(recipe: Recipe, run: Run) -> int:
    if run.resume_from is not None and recipe.train is not None:
        done = finished_step(run.resume_from, recipe.train.max_steps, run.out / recipe.done_file)
        if done:
            run.say(
                f"{run.out} already finished at update {done} of {recipe.train.max_steps}: nothing to do"
                f"{recipe.finished_note} (raise --max-steps to train further)"
            )
            return 0
    check_fused(recipe.fused, run.dist.device)
    recipe.build(run)
    layout, job = batch_layout(recipe.train, run.dist.world_size), recipe.job(run)
    recipe.check_memory(run)  # model, batch layout and job are known, nothing is written yet
    if run.dist.is_main:
        _write_run_dir(recipe, run)
    run.dist.barrier()
    run.say(header(recipe, run, layout, job))
    trainer = Trainer(
        recipe.model, recipe.train, job, dist=run.dist, resume_from=run.resume_from, progress=not run.args.quiet
    )
    t0 = time.perf_counter()
    result = trainer.fit(stop_at=run.args.stop_at)
    code = exit_code(result, run)
    return code if code is not None else recipe.finish(trainer, result, time.perf_counter() - t0)


def _write_run_dir(recipe: Recipe, run: Run) -> None:
    """--overwrite clears the old run; a new run saves its tokenizer; then the recipe's own
    files and the resolved configuration."""
    if run.args.overwrite:
        clear_run_dir(run.out)
        for name in recipe.own_files:
            path = run.out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    run.out.mkdir(parents=True, exist_ok=True)
    if run.resume_from is None:
        recipe.tokenizer.save(run.out / "tokenizer.json")
    recipe.write_run_dir(run)
    save_run_config(run.out, recipe.kind, {**recipe.sections(), elastic.SECTION: elastic.record()})


def header(recipe: Recipe, run: Run, layout: tuple[int, int], job: Job) -> str:
    """What this run is: the recipe's rows about model and data, then device, precision,
    batch, schedule and the resolved configuration."""
    from engine.training.precision import resolve_precision

    cfg, dist, (micro, accum) = recipe.train, run.dist, layout
    where = (
        f"{torch.get_num_threads()} threads" if dist.device.type == "cpu" else torch.cuda.get_device_name(dist.device)
    )
    kernels = "fused kernels" if cfg.fused else "reference ops (--no-fused)"
    tokens = job.tokens_per_sample or 0
    optimizer = "AdamW" if cfg.optimizer == "adamw" else "OpenAI's Adam"
    rows = [
        (
            "device",
            f"{dist.device} ({where}), {dist.world_size} process(es), {kernels}"
            + (", torch.compile" if cfg.compile else ""),
        ),
        *recipe.describe(run),
        ("precision", resolve_precision(cfg.precision, dist.device)[1]),
        (
            "batch",
            f"{cfg.batch_size} × {tokens} tokens = {cfg.batch_size * tokens:,} tokens/update "
            f"({micro} per forward × {accum} accumulation × {dist.world_size} process(es))",
        ),
        (
            "schedule",
            f"{optimizer} lr {cfg.lr:g}, betas ({cfg.beta1}, {cfg.beta2}), eps {cfg.eps:g}, weight decay "
            f"{cfg.weight_decay}, clip {cfg.grad_clip}; warm-up {cfg.warmup_steps} then {cfg.schedule} over "
            f"{cfg.max_steps} updates",
        ),
        ("config", json.dumps({k: dataclasses.asdict(v) for k, v in recipe.sections().items() if k != "model"})),
    ]
    title = recipe.title + (f" — resuming {run.resume_from}" if run.resume_from else "")
    return "\n".join([title, *(f"  {name:<11} {text}" for name, text in rows)])


def model_row(config: GPT1Config, n_params: int, source: str) -> tuple[str, str]:
    """The header's model row: where the model comes from, its shape and size."""
    c = config
    return (
        "model",
        f"{source}: {c.n_layer} layers, n_embd {c.n_embd}, {c.n_head} heads, n_positions {c.n_positions}, "
        f"vocab {c.vocab_size}, dropout {c.resid_pdrop} — {n_params / 1e6:.2f}M parameters",
    )


def exit_code(result: TrainResult, run: Run) -> int | None:
    """The exit code of a run that ended early (the trainer has said why), or None when it
    reached max_steps and the recipe goes on to its final evaluation."""
    if result.status == "diverged":
        return 1
    if result.status == "interrupted":
        return 128 + (result.signal or 0)
    if result.status == "stopped":
        run.say(
            f"stopped at update {result.step} (--stop-at); checkpoint {result.checkpoint}; "
            f"continue with --resume {run.out}"
        )
        return 0
    return None
