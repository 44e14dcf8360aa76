"""The training engine shared by pretraining and fine-tuning.

    cfg = TrainConfig(out="runs/x", max_steps=1000, batch_size=64)
    trainer = Trainer(model, cfg, loss_fn, batches, evaluate=..., tokens_per_sample=512)
    result = trainer.fit()           # -> TrainResult(step, status, ...)

What the caller supplies:

* ``model`` — any nn.Module (``GPT1``, or GPT1 + a task head).
* ``loss_fn(model, batch) -> Tensor`` — the scalar mean loss of one micro-batch; ``model`` is
  the module to call (DDP- or compile-wrapped). It may return ``(loss, {name: float})``.
* ``batches(step, start, count) -> batch`` — samples ``[start, start + count)`` of update
  ``step``'s global batch (``batch_size`` samples), on the CPU. It must be a pure function
  of its arguments: the trainer asks each process (rank) for a different slice, prefetches
  in a thread, and resumes exactly by asking for the same (step, slice) again.

What the trainer does: the paper's optimisation (AdamW, warm-up then cosine/linear decay,
weight decay on matrices and embeddings only, grad-norm clip), gradient accumulation,
bf16 autocast on CUDA, DistributedDataParallel under torchrun, atomic checkpoints keeping
the last K with exact resume, skipping of non-finite updates, SIGINT/SIGTERM handling,
metrics.jsonl + tqdm + loss.png (+ TensorBoard when installed).

Run directory::

    train_config.json               the resolved configuration (written by the CLI)
    metrics.jsonl                   one JSON object per logged step / evaluation
    loss.png                        train and validation loss
    checkpoints/step_00000500/      weights (WeightsIO) + trainer_state.pt, last K kept
    config.json, model.safetensors  the final weights (GPT1: Hugging Face layout)

The run directory's layout and checkpoint I/O live in engine.checkpoint, the CLIs' flag
handling in engine.cli.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from .checkpoint import (
    CHECKPOINTS,
    LOSS_PLOT,
    METRICS,
    TRAINER_STATE,
    WeightsIO,
    default_weights_io,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    rng_state,
    seed_everything,
    set_rng_state,
)
from .cli import UserError, flag_name
from .fileio import _fsync_dir, atomic_write, atomic_write_text
from .flops import PEAK_BF16_FLOPS, flops_per_token  # noqa: F401  (one formula; pretrain/finetune import it from here)


# ---- configuration ----------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Training: optimisation, schedule, devices, checkpoints and logging."""

    out: str = field(default="runs/run", metadata={"help": "run directory: checkpoints, metrics, final weights"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer updates in the whole run (the schedule spans them)"})
    batch_size: int = field(default=64, metadata={"help": "sequences per update, over all processes and accumulation steps (paper: 64)"})
    micro_batch_size: int | None = field(default=None, metadata={"help": "sequences per forward pass per process; fewer than batch_size/processes accumulates gradients (default: no accumulation)"})
    lr: float = field(default=2.5e-4, metadata={"help": "peak learning rate (paper: 2.5e-4)"})
    warmup_steps: int | None = field(default=None, metadata={"help": "updates of linear warm-up from 0 to --lr (default: the paper's 2000, capped at 10%% of max_steps)"})
    schedule: str = field(default="cosine", metadata={"help": "decay after warm-up: cosine to 0 (paper, pretraining), linear to 0 (paper, fine-tuning) or constant", "choices": ("cosine", "linear", "constant")})
    beta1: float = field(default=0.9, metadata={"help": "Adam beta1 (paper: 0.9)"})
    beta2: float = field(default=0.999, metadata={"help": "Adam beta2 (paper: 0.999)"})
    eps: float = field(default=1e-8, metadata={"help": "Adam epsilon (paper: 1e-8)"})
    weight_decay: float = field(default=0.01, metadata={"help": "decoupled (AdamW) weight decay on weight matrices and embeddings; biases and LayerNorm gains get none (paper: 0.01)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this; 0 disables (paper: 1.0)"})
    seed: int = field(default=0, metadata={"help": "seed of the model init, dropout and data order"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto (cuda when available)", "choices": ("auto", "cpu", "cuda")})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16", "choices": ("auto", "fp32", "bf16")})
    fused: bool = field(default=True, metadata={"help": "run the model on the fused kernels (C++ on CPU, Triton on CUDA) instead of the PyTorch reference"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    log_every: int = field(default=10, metadata={"help": "log train loss and throughput every N updates"})
    eval_every: int = field(default=200, metadata={"help": "validate every N updates; 0: only at the end"})
    checkpoint_every: int = field(default=500, metadata={"help": "checkpoint every N updates; 0: only at the end"})
    keep_checkpoints: int = field(default=3, metadata={"help": "checkpoints kept (the newest K)"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many consecutive non-finite losses (each one's update is skipped)"})
    prefetch: int = field(default=4, metadata={"help": "micro-batches a background thread loads ahead"})
    peak_tflops: float | None = field(default=None, metadata={"help": "accelerator peak TFLOP/s for MFU (default: looked up by GPU name; H100/H200 bf16 dense: 989)"})

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "log_every", "keep_checkpoints", "max_bad_steps", "prefetch")
        non_negative = ("eval_every", "checkpoint_every")
        for name in positive + non_negative + ("micro_batch_size", "warmup_steps", "seed"):
            value = getattr(self, name)
            if value is None and name in ("micro_batch_size", "warmup_steps"):
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{flag_name(name)} must be an integer, got {value!r}")
            if name in positive and value <= 0:
                raise ValueError(f"{flag_name(name)} must be positive, got {value}")
            if value < 0:
                raise ValueError(f"{flag_name(name)} must be >= 0, got {value}")
        if self.micro_batch_size == 0:
            raise ValueError("--micro-batch-size must be positive, got 0")
        if self.warmup_steps is None:
            self.warmup_steps = min(2000, max(1, self.max_steps // 10))
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"--warmup-steps ({self.warmup_steps}) must not exceed --max-steps ({self.max_steps})")
        for name in ("lr", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value < math.inf):
                raise ValueError(f"{flag_name(name)} must be a positive finite number, got {value!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{flag_name(name)} must be in [0, 1), got {value!r}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < math.inf):
                raise ValueError(f"{flag_name(name)} must be a finite number >= 0, got {value!r}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"--peak-tflops must be positive, got {self.peak_tflops!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{flag_name(f.name)} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        if not self.out:
            raise ValueError("--out must name a directory")


# ---- optimiser and schedule -------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: weight matrices and embeddings (ndim >= 2) decay, biases and
    LayerNorm gains (ndim < 2) do not. Each group lists its parameter names in "names"."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; torch's fused implementation where the device has it
    (CUDA, and CPU since torch 2.4), else foreach."""
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    device = params[0].device.type if params else "cpu"
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    fused_ok = device in _fused_adamw_devices() and all(p.is_floating_point() for p in params)
    if fused_ok:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def _fused_adamw_devices() -> tuple[str, ...]:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # private helper: fall back to what torch >= 2.4 supports
        return ("cuda", "cpu")


@dataclass
class Schedule:
    """Learning-rate multiplier of update k (0-based): linear warm-up, multiplier (k+1)/W,
    reaching 1 at update W-1; then decay over the remaining updates to 0 at update
    max_steps-1: cosine 0.5·(1 + cos(π·p)) or linear (1 - p), p = (k+1-W)/(max_steps-W)."""

    warmup_steps: int
    max_steps: int
    kind: str = "cosine"

    def __call__(self, k: int) -> float:
        W, N = self.warmup_steps, self.max_steps
        if k + 1 <= W:
            return (k + 1) / W
        if self.kind == "constant":
            return 1.0
        p = min(1.0, (k + 1 - W) / max(1, N - W))
        if self.kind == "linear":
            return 1.0 - p
        return 0.5 * (1.0 + math.cos(math.pi * p))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `Schedule`: update k runs at lr · Schedule(k)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(cfg.warmup_steps, cfg.max_steps, cfg.schedule))


# ---- devices and processes ----------------------------------------------------------------


@dataclass
class DistEnv:
    """This process's place in the job. world_size 1: no torch.distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def setup_distributed(device: str = "auto") -> DistEnv:
    """Joins the torchrun job when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU): one GPU per
    process (LOCAL_RANK). Without torchrun, a single process on `device`."""
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def teardown_distributed(sync: bool = False) -> None:
    """Leaves the process group. sync=True (the normal end of a run) first waits for every
    process: gloo aborts a process that tears down while a peer is still using the group.
    Leave it False after an error, when peers may never arrive."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if sync:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def batch_layout(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, accumulation steps) per process for cfg.batch_size sequences per
    update over `world_size` processes; a ValueError when they do not divide evenly."""
    if cfg.batch_size % world_size:
        raise ValueError(f"--batch-size ({cfg.batch_size}) must be divisible by the number of processes ({world_size})")
    per_rank = cfg.batch_size // world_size
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(
            f"--micro-batch-size ({micro}) must divide the per-process batch "
            f"({cfg.batch_size} / {world_size} processes = {per_rank})"
        )
    return micro, per_rank // micro


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA (auto or bf16), None (fp32) on CPU unless bf16 is asked for."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def to_device(batch: Any, device: torch.device) -> Any:
    """Moves every tensor in a (nested dict/list/tuple) batch; non_blocking from pinned memory."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _pin(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pin(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_pin(v) for v in batch)
    return batch


class Prefetcher:
    """Loads micro-batches in a background thread, in order, `depth` ahead of the step (and
    pins them on CUDA), so reading data overlaps compute. Yields (step, micro, batch)."""

    def __init__(self, jobs: Iterable[tuple[int, int, int, int]], fetch: Callable[[int, int, int], Any], depth: int, pin: bool) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(jobs), fetch, pin), daemon=True, name="prefetch")
        self._thread.start()

    def _run(self, jobs: Iterator[tuple[int, int, int, int]], fetch: Callable, pin: bool) -> None:
        try:
            for step, micro, start, count in jobs:
                batch = fetch(step, start, count)
                item = (step, micro, _pin(batch) if pin else batch)
                while not self._put(item):
                    if self._stop.is_set():
                        return
        except BaseException as e:  # surfaced in the training thread by __next__
            while not self._put(e) and not self._stop.is_set():
                pass

    def _put(self, item: Any) -> bool:
        try:
            self._queue.put(item, timeout=0.1)
            return True
        except queue.Full:
            return False

    def __next__(self) -> tuple[int, int, Any]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=5)


# ---- metrics --------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl (one object per record, each with "step"), TensorBoard scalars when the
    package is installed, and loss.png. Only the main process writes."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / METRICS
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self._tb = None
        if enabled:
            with contextlib.suppress(Exception):  # tensorboard absent or broken: JSONL only
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def resume(self, step: int) -> None:
        """Keeps the records up to `step` (later ones belong to work the checkpoint lost)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("step", 0) <= step:
                    kept.append(rec)
        self.records = kept
        if self.enabled:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def plot(self, path: Path, hlines: dict[str, float] | None = None) -> None:
        """loss.png: train loss and validation loss against the update step; `hlines` adds
        labelled horizontal reference lines (e.g. the unigram entropy)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, label in (("loss", "train"), ("val_loss", "validation")):
            pts = [(r["step"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None, markersize=3)
        for label, y in (hlines or {}).items():
            if math.isfinite(y):
                ax.axhline(y, color="gray", linestyle="--", linewidth=1, label=label)
        ax.set_xlabel("update")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# ---- the loop -------------------------------------------------------------------------------

LossFn = Callable[[nn.Module, Any], "Tensor | tuple[Tensor, dict[str, float]]"]
BatchFn = Callable[[int, int, int], Any]


@dataclass
class TrainResult:
    """How fit() ended. status: "finished" (max_steps reached), "stopped" (stop_at reached),
    "interrupted" (SIGINT/SIGTERM; signal holds its number), "diverged" (max_bad_steps
    consecutive non-finite losses; nothing saved after the last good checkpoint)."""

    step: int
    status: str
    checkpoint: Path | None
    signal: int | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Runs `cfg.max_steps` AdamW updates of `model` on `loss_fn` over `batches`.

    evaluate(trainer) -> {name: float}: called on every process every eval_every updates and
    at the end, with the model in eval mode under no_grad (and autocast); use
    `trainer.eval_loss(batches)` for a mean loss over validation batches. Its dict is
    logged with the step (name your keys "val_loss" etc. to get them plotted).
    extra_state() -> dict / load_extra_state(dict): anything else a checkpoint must hold
    (tensors, numbers, strings, lists, dicts: what torch.load(weights_only=True) reads).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        loss_fn: LossFn,
        batches: BatchFn,
        *,
        evaluate: Callable[["Trainer"], dict[str, float]] | None = None,
        dist: DistEnv | None = None,
        tokens_per_sample: int | None = None,
        flops_per_token: float | None = None,
        weights: WeightsIO | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        load_extra_state: Callable[[dict[str, Any]], None] | None = None,
        resume_from: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.dist = dist or DistEnv(device=resolve_device(cfg.device))
        self.device = self.dist.device
        self.run_dir = Path(cfg.out)
        self.loss_fn, self.batches, self.evaluate = loss_fn, batches, evaluate
        self.tokens_per_sample, self.flops_per_token = tokens_per_sample, flops_per_token
        self.extra_state, self.load_extra_state = extra_state, load_extra_state
        self.progress = progress and self.dist.is_main

        self.micro_batch_size, self.accum_steps = batch_layout(cfg, self.dist.world_size)

        self.model = model.to(self.device)  # the module whose weights are saved
        self.weights = weights or default_weights_io(model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.autocast = autocast_dtype(cfg, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.step = 0
        self.bad_steps = 0
        self.metrics = MetricsLog(self.run_dir, enabled=self.dist.is_main)
        self._signal: int | None = None

        if resume_from is not None:
            self._load_checkpoint(Path(resume_from))
        else:
            seed_everything(cfg.seed + self.dist.rank)  # dropout differs per rank; data does not depend on it

        wrapped: nn.Module = self.model
        if cfg.compile:
            wrapped = torch.compile(wrapped)
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(wrapped, device_ids=ids)
        self.wrapped = wrapped  # what loss_fn calls

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
                    loss = _loss_only(loss_fn(self.model, batch))
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

    # ---- fit -------------------------------------------------------------------------------

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Trains to cfg.max_steps (or until update `stop_at`, saving a checkpoint there as
        an interruption would). SIGINT/SIGTERM finish the current update, save and return."""
        cfg, dist = self.cfg, self.dist
        end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
        jobs = (
            (s, m, (dist.rank * self.accum_steps + m) * self.micro_batch_size, self.micro_batch_size)
            for s in range(self.step, end)
            for m in range(self.accum_steps)
        )
        prefetch = Prefetcher(jobs, self.batches, cfg.prefetch, pin=self.device.type == "cuda")
        bar = self._progress_bar()
        old_handlers = self._install_signal_handlers()
        status, last_ckpt = "finished", None
        params = [p for p in self.model.parameters() if p.requires_grad]
        window_tokens, window_time, window_start = 0, 0.0, self.step
        peak = self._peak_flops()
        self.model.train()
        try:
            while self.step < end:
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=self.device)
                extra: dict[str, float] = {}
                for micro in range(self.accum_steps):
                    _, _, batch = next(prefetch)
                    batch = to_device(batch, self.device)
                    sync = micro == self.accum_steps - 1 or not dist.distributed
                    with (contextlib.nullcontext() if sync else self.wrapped.no_sync()), self.autocast_context():
                        out = self.loss_fn(self.wrapped, batch)
                        loss, more = (out if isinstance(out, tuple) else (out, {}))
                        (loss / self.accum_steps).backward()
                    loss_sum += loss.detach().float()
                    for k, v in more.items():
                        extra[k] = extra.get(k, 0.0) + float(v) / self.accum_steps
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                loss_mean, bad, stop = self._agree(loss_sum / self.accum_steps, norm)
                if bad:
                    self.bad_steps += 1
                    self._write(f"warning: non-finite loss or gradient at update {self.step + 1} "
                                f"(loss {loss_mean}); update skipped ({self.bad_steps}/{cfg.max_bad_steps})", bar)
                else:
                    self.optimizer.step()
                    self.bad_steps = 0
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                window_time += time.perf_counter() - t0
                window_tokens += cfg.batch_size * (self.tokens_per_sample or 0)
                if bar is not None:
                    bar.update(1)
                if self.bad_steps >= cfg.max_bad_steps:
                    status = "diverged"
                    self._write(f"error: {self.bad_steps} consecutive non-finite losses; stopping. "
                                f"The last good checkpoint is {latest_checkpoint(self.run_dir)}", bar)
                    break
                if self.step % cfg.log_every == 0 or self.step == end:
                    rec = {"loss": loss_mean, "lr": self._lr_of_last_update(), "grad_norm": float(norm), **extra}
                    if self.tokens_per_sample:
                        tps = window_tokens / max(window_time, 1e-9)
                        rec["tokens_per_s"] = tps
                        if peak and self.flops_per_token:
                            rec["mfu"] = tps * self.flops_per_token / (peak * dist.world_size)
                    rec["s_per_step"] = window_time / max(1, self.step - window_start)
                    self.log(rec)
                    if bar is not None:
                        bar.set_postfix(_postfix(rec), refresh=False)
                    window_tokens, window_time, window_start = 0, 0.0, self.step
                at_end = self.step == cfg.max_steps
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or at_end:
                    self._evaluate(bar)
                if stop:
                    status = "interrupted"
                    break
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or at_end:
                    last_ckpt = self.save_checkpoint()
            else:
                if stop_at is not None and self.step < cfg.max_steps:
                    status = "stopped"
            if status in ("interrupted", "stopped"):
                last_ckpt = self.save_checkpoint()
            if status != "diverged" and dist.is_main:
                self.weights.save(self.model, self.run_dir)
        finally:
            self._restore_signal_handlers(old_handlers)
            prefetch.close()
            if bar is not None:
                bar.close()
            self.metrics.plot(self.run_dir / LOSS_PLOT)
            self.metrics.close()
        if status == "interrupted":
            self._write(f"interrupted by signal {self._signal} at update {self.step}; checkpoint "
                        f"{last_ckpt}; continue with --resume {self.run_dir}", None)
        return TrainResult(self.step, status, last_ckpt or latest_checkpoint(self.run_dir), self._signal, self.metrics.records)

    # ---- internals -------------------------------------------------------------------------

    def _lr_of_last_update(self) -> float:
        """The lr the update just taken ran at (the scheduler has already moved on)."""
        return self.cfg.lr * self.scheduler.lr_lambdas[0](self.step - 1)

    def _agree(self, loss: Tensor, norm: Tensor) -> tuple[float, bool, bool]:
        """The loss averaged over processes, whether any process saw a non-finite loss or
        gradient, and whether any was signalled: every process takes the same decision."""
        bad = (~torch.isfinite(loss)) | (~torch.isfinite(norm))
        stats = torch.stack([torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0), bad.float(),
                             torch.tensor(float(self._signal is not None), device=loss.device)]).double()
        if self.dist.distributed:
            torch.distributed.all_reduce(stats)
        loss_mean, n_bad, n_stop = stats.tolist()
        loss_value = loss.item() if n_bad else loss_mean / self.dist.world_size
        return loss_value, n_bad > 0, n_stop > 0

    def _evaluate(self, bar: Any) -> None:
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
            if bar is not None:
                self._write(f"update {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()), bar)

    def save_checkpoint(self) -> Path:
        """Writes checkpoints/step_<step>/ (weights + trainer_state.pt) atomically: files go to
        a temporary directory, each fsynced, which is then renamed into place. Keeps the
        newest cfg.keep_checkpoints. Every process must call it (RNG states are gathered)."""
        rng = rng_state()
        if self.dist.distributed:
            states: list[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(states, rng)
        else:
            states = [rng]
        final = self.run_dir / CHECKPOINTS / f"step_{self.step:08d}"
        if self.dist.is_main and not (final / TRAINER_STATE).is_file():
            state = {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": states,
                "data": {"next_step": self.step},  # batches are a pure function of (step, slice)
                "bad_steps": self.bad_steps,
                "world_size": self.dist.world_size,
                "train_config": dataclasses.asdict(self.cfg),
                "extra": self.extra_state() if self.extra_state else {},
            }
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
            try:
                self.weights.save(self.model, tmp)
                atomic_write(tmp / TRAINER_STATE, lambda p: torch.save(state, p))
                _fsync_dir(tmp)
                os.replace(tmp, final)
                _fsync_dir(final.parent)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            for old in list_checkpoints(self.run_dir)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return final

    def _load_checkpoint(self, ckpt: Path) -> None:
        state = load_trainer_state(ckpt)
        self.weights.load(self.model, ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule follows this run's config (load_state_dict restored the saved one's).
        self.scheduler.lr_lambdas[0] = schedule = Schedule(self.cfg.warmup_steps, self.cfg.max_steps, self.cfg.schedule)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * schedule(self.scheduler.last_epoch)
        self.step = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            set_rng_state(rngs[self.dist.rank])
        else:
            warnings.warn(f"checkpoint written by {len(rngs)} processes, resumed on {self.dist.world_size}: "
                          "dropout RNG reseeded (data order is unaffected)", RuntimeWarning, stacklevel=3)
            seed_everything(self.cfg.seed + self.dist.rank + self.step)
        if self.load_extra_state is not None:
            self.load_extra_state(state.get("extra", {}))
        self.metrics.resume(self.step)

    def _progress_bar(self) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                    file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 5.0)

    def _write(self, message: str, bar: Any) -> None:
        if not self.dist.is_main:
            return
        if bar is not None:
            bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

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


def _loss_only(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _leading_dim(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _leading_dim(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return _leading_dim(batch[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def _postfix(rec: dict[str, Any]) -> dict[str, str]:
    out = {"loss": f"{rec['loss']:.3f}"}
    if "tokens_per_s" in rec:
        out["tok/s"] = f"{rec['tokens_per_s']:,.0f}"
    if "mfu" in rec:
        out["mfu"] = f"{100 * rec['mfu']:.1f}%"
    out["lr"] = f"{rec['lr']:.2e}"
    return out
