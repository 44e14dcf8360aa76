"""TrainConfig: optimisation, schedule, devices, checkpoints and logging of a training run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from engine.cli import flag_name


@dataclass
class TrainConfig:
    """Training: optimisation, schedule, devices, checkpoints and logging."""

    out: str = field(default="runs/run", metadata={"help": "run directory: checkpoints, metrics, final weights"})
    max_steps: int = field(
        default=1000, metadata={"help": "optimizer updates in the whole run (the schedule spans them)"}
    )
    batch_size: int = field(
        default=64, metadata={"help": "sequences per update, over all processes and accumulation steps (paper: 64)"}
    )
    micro_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "sequences per forward pass per process; fewer than batch_size/processes accumulates gradients "
            "(default: no accumulation)"
        },
    )
    lr: float = field(default=2.5e-4, metadata={"help": "peak learning rate (paper: 2.5e-4)"})
    warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "updates of linear warm-up from 0 to --lr (default: the paper's 2000, capped at 10%% of max_steps)"
        },
    )
    schedule: str = field(
        default="cosine",
        metadata={
            "help": "decay after warm-up: cosine to 0 (paper, pretraining), linear to 0 (paper, fine-tuning) "
            "or constant",
            "choices": ("cosine", "linear", "constant"),
        },
    )
    beta1: float = field(default=0.9, metadata={"help": "Adam beta1 (paper: 0.9)"})
    beta2: float = field(default=0.999, metadata={"help": "Adam beta2 (paper: 0.999)"})
    eps: float = field(default=1e-8, metadata={"help": "Adam epsilon (paper: 1e-8)"})
    weight_decay: float = field(
        default=0.01,
        metadata={
            "help": "decoupled (AdamW) weight decay on weight matrices and embeddings; biases and LayerNorm gains "
            "get none (paper: 0.01)"
        },
    )
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": "adamw (torch's, fused where the device has it) or openai-adam (OpenAI's GPT-1 Adam: bias "
            "correction folded into the step, decay scaled by it, eps on the uncorrected sqrt(v); "
            "engine.training.optim)",
            "choices": ("adamw", "openai-adam"),
        },
    )
    zero1: bool = field(
        default=False,
        metadata={
            "help": "ZeRO-1 under torchrun: each process keeps the optimizer state of its share of the parameters "
            "(torch.distributed.optim.ZeroRedundancyOptimizer); checkpoints stay one whole file that any number "
            "of processes resumes, with or without it"
        },
    )
    grad_clip: float = field(
        default=1.0, metadata={"help": "clip the global gradient norm to this; 0 disables (paper: 1.0)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the model init, dropout and data order"})
    device: str = field(
        default="auto",
        metadata={"help": "cpu, cuda, or auto (cuda when available)", "choices": ("auto", "cpu", "cuda")},
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "auto (bf16 autocast on CUDA and on CPUs with AMX-BF16 or AVX512-BF16, fp32 elsewhere), "
            "fp32 or bf16",
            "choices": ("auto", "fp32", "bf16"),
        },
    )
    fused: bool = field(
        default=True,
        metadata={
            "help": "run the model on the fused kernels (C++ on CPU, Triton on CUDA) instead of the PyTorch reference"
        },
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    log_every: int = field(default=10, metadata={"help": "log train loss and throughput every N updates"})
    eval_every: int = field(default=200, metadata={"help": "validate every N updates; 0: only at the end"})
    checkpoint_every: int = field(default=500, metadata={"help": "checkpoint every N updates; 0: only at the end"})
    keep_checkpoints: int = field(default=3, metadata={"help": "checkpoints kept (the newest K)"})
    max_bad_steps: int = field(
        default=5,
        metadata={"help": "stop after this many consecutive non-finite losses (each one's update is skipped)"},
    )
    prefetch: int = field(default=4, metadata={"help": "micro-batches a background thread loads ahead"})
    peak_tflops: float | None = field(
        default=None,
        metadata={
            "help": "accelerator peak TFLOP/s for MFU (default: looked up by GPU name; H100/H200 bf16 dense: 989)"
        },
    )

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
                raise ValueError(
                    f"{flag_name(f.name)} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}"
                )
        if not self.out:
            raise ValueError("--out must name a directory")
