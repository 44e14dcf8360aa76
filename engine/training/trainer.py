"""The training engine shared by pretraining and fine-tuning.

    cfg = TrainConfig(out="runs/x", max_steps=1000, batch_size=64)
    trainer = Trainer(model, cfg, Job(loss_fn, batches, evaluate=..., tokens_per_sample=512))
    result = trainer.fit()           # -> TrainResult(step, status, ...)

What the caller supplies: ``model`` (any nn.Module: ``GPT1``, or GPT1 + a task head) and a
``Job`` (the loss, the batches and the rest of the caller's half of a run, see Job).

What the trainer does: the paper's optimisation (AdamW, warm-up then cosine/linear decay
set as group["lr"] = lr · Schedule(step) before each update, weight decay on matrices and
embeddings only, grad-norm clip), gradient accumulation, bf16 autocast on CUDA,
DistributedDataParallel under torchrun (optimizer state sharded with --zero1), atomic
checkpoints keeping the last K good ones with exact resume on any number of processes (one
whole file; falling back from a corrupt newest one), skipping of non-finite updates (no
checkpoint or final weights from inside a non-finite streak), SIGINT/SIGTERM handling,
metrics.jsonl + progress (a tqdm bar on a terminal, plain lines otherwise) + loss.png
(+ TensorBoard when installed).

``Trainer.train_step(micro_batches)`` is one update; ``fit`` is the loop around it that only
keeps the cadence (log, evaluate, checkpoint, stop). ``state_dict()`` / ``load_state_dict()``
are the trainer's state (all but the weights) that a checkpoint holds.

Run directory::

    train_config.json               the resolved configuration (written by the CLI)
    metrics.jsonl                   one JSON object per logged step / evaluation
    loss.png                        train and validation loss (MetricsLog.plot panels)
    checkpoints/step_00000500/      weights (WeightsIO) + trainer_state.pt + checkpoint.json
                                    (good or not, file sizes), the last K good ones kept
    config.json, model.safetensors  the final weights (GPT1: Hugging Face layout)

The run directory's layout and checkpoint I/O live in engine.training.checkpoint, the CLIs' flag
handling in engine.cli.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from engine.training.checkpoint import (
    LOSS_PLOT,
    WeightsIO,
    checkpoint_dir,
    default_weights_io,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from engine.training.config import TrainConfig
from engine.training.distributed import DistEnv, batch_layout, micro_batches, resolve_device
from engine.training.flops import PEAK_BF16_FLOPS
from engine.training.metrics_log import MetricsLog
from engine.training.optim import Schedule, build_optimizer, load_optimizer_state, optimizer_state, state_bytes
from engine.training.precision import autocast_dtype
from engine.training.prefetch import Prefetcher, to_device
from engine.training.progress import Progress

LossFn = Callable[[nn.Module, Any], "Tensor | tuple[Tensor, dict[str, float]]"]
BatchFn = Callable[[int, int, int], Any]


@dataclass
class Job:
    """What the trainer trains on: the caller's half of a run.

    loss_fn(model, batch) -> Tensor: the scalar mean loss of one micro-batch; `model` is the
    module to call (DDP- or compile-wrapped). It may return (loss, {name: float}).
    batches(step, start, count) -> batch: samples [start, start + count) of update `step`'s
    global batch (batch_size samples), on the CPU. A pure function of its arguments: the
    trainer asks each process for a different slice, prefetches in a thread, and resumes
    exactly by asking for the same (step, slice) again.
    evaluate(trainer) -> {name: float}: called on every process every eval_every updates and
    at the end, with the model in eval mode under no_grad (and autocast); use
    `trainer.eval_loss(batches)` for a mean loss over validation batches. Its dict is logged
    with the step (name your keys "val_loss" etc. to get them plotted).
    extra_state() -> dict / load_extra_state(dict): anything else a checkpoint must hold
    (tensors, numbers, strings, lists, dicts: what torch.load(weights_only=True) reads).
    """

    loss_fn: LossFn
    batches: BatchFn
    evaluate: Callable[[Trainer], dict[str, float]] | None = None
    tokens_per_sample: int | None = None  # for tokens/s
    flops_per_token: float | None = None  # for MFU (engine.training.flops)
    weights: WeightsIO | None = None  # how checkpoints hold the weights (default: by the model's type)
    extra_state: Callable[[], dict[str, Any]] | None = None
    load_extra_state: Callable[[dict[str, Any]], None] | None = None


@dataclass
class TrainResult:
    """How fit() ended. status: "finished" (max_steps reached), "stopped" (stop_at reached),
    "interrupted" (SIGINT/SIGTERM; signal holds its number), "diverged" (max_bad_steps
    consecutive non-finite losses, or the run ended inside a shorter streak: no final
    weights written, nothing saved after the last good checkpoint, which `checkpoint` names).
    """

    step: int
    status: str
    checkpoint: Path | None
    signal: int | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepOutput:
    """What one update (Trainer.train_step) did."""

    loss: float  # mean over micro-batches and processes; the non-finite value when bad
    grad_norm: float  # before clipping
    extra: dict[str, float]  # the extra numbers loss_fn returned, averaged over micro-batches
    bad: bool  # some process saw a non-finite loss or gradient: the update was skipped
    stop: bool  # some process was signalled (SIGINT/SIGTERM)
    seconds: float


class Trainer:
    """Runs `cfg.max_steps` AdamW updates of `model` on `job`'s loss over its batches.

    resume_from: a checkpoint (or a run directory: its newest good one); an unreadable one
    falls back to the newest older one that reads (engine.training.checkpoint.load_checkpoint).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        job: Job,
        *,
        dist: DistEnv | None = None,
        resume_from: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.dist = dist or DistEnv(device=resolve_device(cfg.device))
        self.device = self.dist.device
        self.run_dir = Path(cfg.out)
        self.loss_fn, self.batches, self.evaluate = job.loss_fn, job.batches, job.evaluate
        self.tokens_per_sample, self.flops_per_token = job.tokens_per_sample, job.flops_per_token
        self.extra_state, self.load_extra_state = job.extra_state, job.load_extra_state
        self.progress = progress and self.dist.is_main
        self.micro_batch_size, self.accum_steps = batch_layout(cfg, self.dist.world_size)

        self.model = model.to(self.device)  # the module whose weights are saved
        self.weights = job.weights or default_weights_io(model)
        self.optimizer = build_optimizer(self.model, cfg, self.dist.world_size)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.schedule = Schedule(cfg.warmup_steps, cfg.max_steps, cfg.schedule)
        self.autocast = autocast_dtype(cfg, self.device)
        if self.device.type == "cuda":  # fp32 is IEEE fp32 in cuBLAS as in the Triton kernels: no TF32
            torch.set_float32_matmul_precision("highest")
        self.step = 0
        self.bad_steps = 0
        self.metrics = MetricsLog(self.run_dir, enabled=self.dist.is_main)
        self.resumed_from: Path | None = None
        self._signal: int | None = None
        self._saved: tuple[int, Path] | None = None  # (step, checkpoint) of the last save
        self._progress = Progress(
            cfg.max_steps, 0, enabled=False
        )  # fit() makes the real one; warnings before go to stderr

        if resume_from is not None:
            self.resume(resume_from)
        else:
            seed_everything(cfg.seed + self.dist.rank)  # dropout differs per rank; data does not depend on it
        self.wrapped = self._wrap(self.model)  # what loss_fn calls

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.cfg.compile:
            model = torch.compile(model)
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        return model

    # ---- pieces users may call ------------------------------------------------------------

    def autocast_context(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @torch.no_grad()
    def eval_loss(self, batches: Iterable[Any], loss_fn: LossFn | None = None) -> float:
        """Mean of loss_fn over `batches` (each weighted by its leading dimension), averaged
        over all processes: give each process a different part of the validation set."""
        loss_fn = loss_fn or self.loss_fn
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                batch = to_device(batch, self.device)
                with self.autocast_context():
                    loss = _split(loss_fn(self.model, batch))[0]
                n = _leading_dim(batch)
                total[0] += loss.double() * n
                total[1] += n
        finally:
            self.model.train(was_training)
        if self.dist.distributed:
            torch.distributed.all_reduce(total)
        return (total[0] / total[1]).item() if total[1] > 0 else float("nan")

    def log(self, record: dict[str, Any]) -> None:
        """Appends a record (with "step") to metrics.jsonl on the main process."""
        self.metrics.log({"step": self.step, **record})

    # ---- one update ------------------------------------------------------------------------

    def train_step(self, micro_batches: Iterable[Any]) -> StepOutput:
        """One update from this process's `accum_steps` micro-batches: forward and backward
        of each (DDP syncs gradients on the last), the grad-norm clip, the decision every
        process shares (a non-finite loss or gradient anywhere skips the update), and the
        AdamW step at lr · schedule(step). Advances self.step."""
        t0 = time.perf_counter()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.schedule(self.step)
        loss_sum, extra = self._accumulate(micro_batches)
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        loss, bad, stop = self._agree(loss_sum / self.accum_steps, norm)
        if bad:
            self.bad_steps += 1
            self._write(
                f"warning: non-finite loss or gradient at update {self.step + 1} (loss {loss}); "
                f"update skipped ({self.bad_steps}/{self.cfg.max_bad_steps})"
            )
        else:
            self.optimizer.step()
            self.bad_steps = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return StepOutput(loss, float(norm), extra, bad, stop, time.perf_counter() - t0)

    def _accumulate(self, micro_batches: Iterable[Any]) -> tuple[Tensor, dict[str, float]]:
        """Backward of each micro-batch's loss / accum_steps; (summed loss, averaged extras)."""
        loss_sum = torch.zeros((), device=self.device)
        extra: dict[str, float] = {}
        n = 0
        for n, batch in enumerate(micro_batches, 1):
            batch = to_device(batch, self.device)
            sync = n == self.accum_steps or not self.dist.distributed  # DDP all-reduces on the last only
            with contextlib.nullcontext() if sync else self.wrapped.no_sync(), self.autocast_context():
                loss, more = _split(self.loss_fn(self.wrapped, batch))
                (loss / self.accum_steps).backward()
            loss_sum += loss.detach().float()
            for k, v in more.items():
                extra[k] = extra.get(k, 0.0) + float(v) / self.accum_steps
        if n != self.accum_steps:
            raise ValueError(f"train_step needs {self.accum_steps} micro-batches (accumulation steps), got {n}")
        return loss_sum, extra

    def _agree(self, loss: Tensor, norm: Tensor) -> tuple[float, bool, bool]:
        """The loss averaged over processes, whether any process saw a non-finite loss or
        gradient, and whether any was signalled: every process takes the same decision."""
        bad = (~torch.isfinite(loss)) | (~torch.isfinite(norm))
        stats = torch.stack(
            [
                torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0),
                bad.float(),
                torch.tensor(float(self._signal is not None), device=loss.device),
            ]
        ).double()
        if self.dist.distributed:
            torch.distributed.all_reduce(stats)
        loss_mean, n_bad, n_stop = stats.tolist()
        loss_value = loss.item() if n_bad else loss_mean / self.dist.world_size
        return loss_value, n_bad > 0, n_stop > 0

    # ---- the loop: cadence only -------------------------------------------------------------

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Trains to cfg.max_steps (or until update `stop_at`, saving a checkpoint there as
        an interruption would). SIGINT/SIGTERM finish the current update, save and return."""
        end = self.cfg.max_steps if stop_at is None else min(stop_at, self.cfg.max_steps)
        slices = micro_batches(self.dist.rank, self.micro_batch_size, self.accum_steps)
        jobs = ((s, m, start, count) for s in range(self.step, end) for m, (start, count) in enumerate(slices))
        prefetch = Prefetcher(jobs, self.batches, self.cfg.prefetch, pin=self.device.type == "cuda")
        self._progress = Progress(self.cfg.max_steps, self.step, self.progress)
        old_handlers = self._install_signal_handlers()
        self.model.train()
        try:
            status, checkpoint = self._finish(self._loop(prefetch, end))
            self.metrics.plot(self.run_dir / LOSS_PLOT)
        finally:
            self._restore_signal_handlers(old_handlers)
            prefetch.close()
            self._progress.close()
            self.metrics.close()
        return TrainResult(self.step, status, checkpoint, self._signal, self.metrics.records)

    def _loop(self, prefetch: Prefetcher, end: int) -> str:
        """Updates until `end`: logs, evaluates and checkpoints at their cadence; returns
        how it ended ("finished", "stopped", "interrupted" or "diverged")."""
        cfg, due = self.cfg, self._due
        window = _Window(self.step)
        first = self.step + 1
        while self.step < end:
            out = self.train_step(next(prefetch)[2] for _ in range(self.accum_steps))
            if self.step == first and self.dist.distributed:
                self._report_optimizer_state()
            window.add(out.seconds, cfg.batch_size * (self.tokens_per_sample or 0))
            self._progress.advance()
            if self.bad_steps >= cfg.max_bad_steps:
                return "diverged"
            at_end = self.step == cfg.max_steps
            if due(cfg.log_every) or self.step == end:
                self._log_update(out, window)
                window = _Window(self.step)
            if due(cfg.eval_every) or at_end:
                self._evaluate()
            if out.stop:
                return "interrupted"
            if due(cfg.checkpoint_every) or at_end:
                self.save_checkpoint()
        return "finished" if self.step >= cfg.max_steps else "stopped"

    def _due(self, every: int) -> bool:
        """Whether the update just taken is on an `every`-update cadence (0: never)."""
        return bool(every) and self.step % every == 0

    def _finish(self, status: str) -> tuple[str, Path | None]:
        """The end of a run: a checkpoint and the final weights, unless it ends inside a
        non-finite streak: that is a divergence, and nothing is written from that state."""
        if self.bad_steps and status != "interrupted":
            status = "diverged"
        if status == "diverged":
            good = latest_checkpoint(self.run_dir)
            why = "stopping" if self.bad_steps >= self.cfg.max_bad_steps else "the run ended inside the streak"
            self._write(
                f"error: {self.bad_steps} consecutive non-finite losses up to update {self.step}; {why}; no final "
                f"weights written. The last good checkpoint is {good or 'none (none was saved)'}"
            )
            return status, good
        checkpoint = self.save_checkpoint()
        if self.dist.is_main and not self.bad_steps:
            self.weights.save(self.model, self.run_dir)
        if status == "interrupted":
            self._write(
                f"interrupted by signal {self._signal} at update {self.step}; checkpoint "
                f"{checkpoint}; continue with --resume {self.run_dir}"
            )
        return status, checkpoint

    def _log_update(self, out: StepOutput, window: "_Window") -> None:
        """A metrics record of the update just taken (lr: the one it ran at) and its line."""
        lr = self.optimizer.param_groups[0]["lr"]
        rec: dict[str, Any] = {"loss": out.loss, "lr": lr, "grad_norm": out.grad_norm, **out.extra}
        if self.tokens_per_sample:
            rec["tokens_per_s"] = tps = window.tokens / max(window.seconds, 1e-9)
            peak = self._peak_flops()
            if peak and self.flops_per_token:
                rec["mfu"] = tps * self.flops_per_token / (peak * self.dist.world_size)
        rec["s_per_step"] = window.seconds / max(1, self.step - window.start)
        self.log(rec)
        self._progress.show(self.step, rec)

    def _report_optimizer_state(self) -> None:
        """One line and a metrics record: the optimizer state the most loaded process holds, from
        the first update on (ZeRO-1: its share; else all of it). Every process must call it."""
        held = float(state_bytes(self.optimizer))
        peak, total = (torch.tensor([held], dtype=torch.float64, device=self.device) for _ in range(2))
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(total)
        mb, n = peak.item() / 2**20, self.dist.world_size
        how = f"ZeRO-1: {total.item() / 2**20:.2f} MB sharded over {n} processes" if self.cfg.zero1 else "replicated"
        self.log({"optimizer_state_mb_per_process": mb})
        self._write(f"optimizer state: {mb:.2f} MB per process at most ({how})")

    def _evaluate(self) -> None:
        if self.evaluate is None:
            return
        self.model.eval()
        try:
            with torch.no_grad():
                result = self.evaluate(self)
        finally:
            self.model.train()
        if result:
            self.log(dict(result))
            if self.progress:
                self._write(f"update {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))

    # ---- state and checkpoints ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights that continuing exactly needs: step, optimizer, every
        process's RNG state, the non-finite streak, the config and `extra_state()`. Every
        process must call it (RNG states and ZeRO-1's optimizer shards are gathered; the
        optimizer state is rank 0's to save, None on the others)."""
        rng = rng_state()
        rngs: list[Any] = [rng]
        if self.dist.distributed:
            rngs = [None] * self.dist.world_size
            torch.distributed.all_gather_object(rngs, rng)
        return {
            "step": self.step,
            "optimizer": optimizer_state(self.optimizer),  # whole, whatever the processes and ZeRO-1
            "rng": rngs,
            # batches are a pure function of (step, sample): windows_consumed = step × batch_size
            "data": {"next_step": self.step, "windows_consumed": self.step * self.cfg.batch_size},
            "bad_steps": self.bad_steps,
            "world_size": self.dist.world_size,
            "train_config": dataclasses.asdict(self.cfg),
            "extra": self.extra_state() if self.extra_state else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from `state_dict()`'s result (the weights are loaded separately). The
        learning rate follows this run's schedule from the restored step on."""
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.step = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:  # each process draws its dropout from its own stream: there is no stream to continue
            self._write(
                f"note: checkpoint written by {len(rngs)} process(es), resumed on {self.dist.world_size}: dropout "
                "reseeded (seed + rank + step); weights, optimizer, schedule and data order continue exactly"
            )
            seed_everything(self.cfg.seed + self.dist.rank + self.step)
        if self.load_extra_state is not None:
            self.load_extra_state(state.get("extra", {}))
        self.metrics.resume(self.step)

    def resume(self, checkpoint: str | Path) -> Path:
        """Loads weights and trainer state from `checkpoint` (falling back from an unreadable
        one, see engine.training.checkpoint.load_checkpoint); returns the checkpoint used."""
        used, state = load_checkpoint(checkpoint, lambda d: self.weights.load(self.model, d), warn=self._write)
        self.load_state_dict(state)
        self.resumed_from = used
        self._saved = (self.step, used)
        return used

    def save_checkpoint(self) -> Path | None:
        """Writes checkpoints/step_<step>/ (engine.training.checkpoint.save_checkpoint), keeping the
        newest cfg.keep_checkpoints good ones; returns it. Inside a non-finite streak nothing
        is written and the last good checkpoint (or None) is returned. Every process must
        call it (RNG states are gathered)."""
        if self.bad_steps:
            return latest_checkpoint(self.run_dir)
        if self._saved is not None and self._saved[0] == self.step:
            return self._saved[1]
        state = self.state_dict()
        path = checkpoint_dir(self.run_dir, self.step)
        if self.dist.is_main:
            save_checkpoint(
                self.run_dir,
                self.step,
                state,
                lambda d: self.weights.save(self.model, d),
                good=self.bad_steps == 0,
                keep=self.cfg.keep_checkpoints,
            )
        self.dist.barrier()
        self._saved = (self.step, path)
        return path

    # ---- internals -------------------------------------------------------------------------

    def _write(self, message: str) -> None:
        if self.dist.is_main:
            self._progress.write(message)

    def _peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        if self.cfg.peak_tflops:
            return self.cfg.peak_tflops * 1e12
        name = torch.cuda.get_device_name(self.device)
        return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            self._signal = signum
            # A second Ctrl-C kills at once.
            signal.signal(signum, signal.SIG_DFL)

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
        return old

    @staticmethod
    def _restore_signal_handlers(old: dict[int, Any]) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)


@dataclass
class _Window:
    """Updates since the last log line, for throughput."""

    start: int
    tokens: int = 0
    seconds: float = 0.0

    def add(self, seconds: float, tokens: int) -> None:
        self.seconds += seconds
        self.tokens += tokens


def _split(out: Any) -> tuple[Tensor, dict[str, float]]:
    """loss_fn's result as (loss, extra numbers)."""
    return out if isinstance(out, tuple) else (out, {})


def _leading_dim(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _leading_dim(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _leading_dim(batch[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")
