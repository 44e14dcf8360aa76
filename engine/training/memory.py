"""Memory before it is spent: a training step's peak memory, estimated from the model's shape,
against what the device has, checked before the first update (issue 23).

    peak = weights + gradients + optimizer state + token batches in flight
           + what autograd saves for one micro-batch + the step's largest transient

What autograd saves is counted op by op for each path and precision (`saved`): the fused
kernels save no (T, T) attention matrix and no logits, the reference ops save both; under
bf16 autocast matmuls save bf16 copies of their inputs; dropout masks are the dropped
tensor's dtype on the CPU and bool on CUDA. tests/engine/training/test_memory.py checks the
count against torch's saved-tensor hooks exactly and the whole estimate against the peak RSS
of real steps (bench/results/step-memory-*.txt).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.cli import UserError
from engine.model.config import GPT1Config
from engine.training.config import TrainConfig
from engine.training.distributed import DistEnv, batch_layout
from engine.training.precision import autocast_dtype

# The fused CPU LM head's logits chunk (csrc/linear_cross_entropy.cpp: kTargetElems, kMinRows,
# kMaxElems) and the Triton one's (kernels/linear_cross_entropy.py: CHUNK_BYTES).
CPU_CHUNK_ELEMS, CPU_MIN_ROWS, CPU_MAX_ELEMS = 1 << 22, 256, 1 << 24
CUDA_CHUNK_BYTES = 256 << 20
# Resident memory over live tensors: glibc keeps freed heap blocks (tensors under its 32 MiB
# mmap ceiling), so CPU steps peaked 9-52% above their live tensors (bench/results/step-memory-*.txt);
# the CUDA caching allocator's fragmentation is taken to be no worse (not measured: no GPU then).
ALLOCATOR_SLACK = 1.55


@dataclass(frozen=True)
class Step:
    """What one training step's memory depends on: the model, the tokens per sequence, the
    path (fused kernels or reference ops), bf16 autocast or fp32, the device type, the
    micro-batches the prefetcher holds ahead and the sequences of one sample (fine-tuning:
    both orders of a pair, one per choice)."""

    config: GPT1Config
    seq_len: int
    fused: bool
    bf16: bool
    device: str  # "cpu" or "cuda"
    prefetch: int = 4
    sequences: int = 1

    def saved(self, batch: int) -> int:
        """Bytes autograd saves in the forward of `batch` sequences (what the backward reads)."""
        c, T = self.config, self.seq_len
        N, C, F, H, V = batch * T, c.n_embd, c.n_inner, c.n_head, c.vocab_size
        a = 2 if self.bf16 else 4  # matmul outputs and the copies matmuls save
        mask = (lambda size: 1) if self.device == "cuda" else (lambda size: size)  # bytes per dropped element
        ids = 8 * batch * (T + 1)
        embed = mask(4) * N * C if c.embd_pdrop > 0 and c.embd_dropout == "sum" else 0
        if self.fused:  # x and n (4 + the bf16 copy), qkv, out, a, m; pre, g; logsumexp; LN statistics
            layer = (8 + 6 * a + (4 if self.bf16 else 0)) * N * C + 2 * a * N * F + 4 * batch * H * T + 16 * N
            head = a * N * C  # the gradient the forward already computed
        else:  # x, qkv, y, s1, n, s2; z, g; the probabilities (before and after dropout); LN statistics
            layer = (6 * a + 8) * N * C + 2 * a * N * F + a * batch * H * T * T + 16 * N
            if c.resid_pdrop > 0:
                layer += 2 * mask(a) * N * C
            if c.attn_pdrop > 0:
                layer += (a + mask(a)) * batch * H * T * T
            head = a * N * C + 4 * N * V + 8 * N  # hidden, fp32 log-probabilities, the targets' copy
        return ids + embed + c.n_layer * layer + head

    def transient(self, batch: int) -> int:
        """The largest temporary the step adds to what is saved, at one moment: the LM head's
        (the reference's logits gradients; the fused kernel's logits chunk and weight gradient)
        or a block's backward (the FFN's two (N, F) gradients; the reference attention's three
        (T, T) ones), whichever is larger."""
        c, T = self.config, self.seq_len
        N, C, F, H, V = batch * T, c.n_embd, c.n_inner, c.n_head, c.vocab_size
        a = 2 if self.bf16 else 4
        block = 2 * a * N * F + 8 * N * C
        if not self.fused:
            return max(8 * N * V + (2 * N * V if self.bf16 else 0), block, 3 * a * batch * H * T * T + 16 * N * C)
        if self.device == "cuda":
            chunk = min(N * V * 4, CUDA_CHUNK_BYTES)
        else:
            chunk = 4 * V * max(1, min(N, max(CPU_CHUNK_ELEMS // V, CPU_MIN_ROWS), CPU_MAX_ELEMS // V))
        return max(chunk + 4 * V * C * (2 if self.bf16 else 1) + 4 * N * C, block)

    def fixed(self) -> int:
        """What the forward adds whatever the batch: autocast's bf16 copies of the weights, and
        under embd_dropout="matrix" the dropped tables and their masks."""
        c = self.config
        tables = (c.vocab_size + c.n_positions) * c.n_embd
        dropped = (4 + (1 if self.device == "cuda" else 4)) * tables if c.embd_dropout == "matrix" else 0
        return (2 * c.num_parameters() if self.bf16 else 0) + dropped

    def peak(self, batch: int) -> "StepMemory":
        """The estimate for micro-batches of `batch` samples."""
        p, n = self.config.num_parameters(), batch * self.sequences
        return StepMemory(
            weights=4 * p,
            gradients=4 * p,
            optimizer=8 * p,  # Adam's two moments, fp32
            data=(self.prefetch + 2) * 8 * n * (self.seq_len + 1),
            activations=round(ALLOCATOR_SLACK * (self.saved(n) + self.transient(n))) + self.fixed(),
            batch=batch,
        )


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one training step at its peak, by part."""

    weights: int
    gradients: int
    optimizer: int
    data: int
    activations: int
    batch: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.data + self.activations


def available(device: torch.device) -> tuple[int, str]:
    """(bytes this process can still allocate on `device`, where that number comes from):
    CUDA's free memory; on the CPU MemAvailable, or the cgroup's limit less its usage when lower."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    found = [(_meminfo_available(), "MemAvailable")]
    for limit, usage, stat, inactive in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        free = _cgroup_free(Path("/sys/fs/cgroup"), limit, usage, (stat, inactive))
        if free is not None:
            found.append((free, "the cgroup's memory limit"))
    return min(found)


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def _cgroup_free(root: Path, limit: str, usage: str, reclaimable: tuple[str, str]) -> int | None:
    """limit - usage + reclaimable page cache of this cgroup, or None without a limit."""
    try:
        text = (root / limit).read_text().strip()
        if text == "max" or int(text) >= 2**62:
            return None
        stat = dict(line.split() for line in (root / reclaimable[0]).read_text().splitlines() if " " in line)
        return int(text) - int((root / usage).read_text()) + int(stat.get(reclaimable[1], 0))
    except (OSError, ValueError):
        return None


def fitting_micro_batch(step: Step, per_rank: int, limit: int) -> int | None:
    """The largest micro-batch that divides `per_rank` and whose estimate is within `limit`."""
    divisors = (d for d in range(per_rank, 0, -1) if per_rank % d == 0)
    return next((d for d in divisors if step.peak(d).total <= limit), None)


def size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def refusal(step: Step, need: StepMemory, limit: int, source: str, per_rank: int) -> str:
    """The one line that refuses a step: the estimate, the limit and what fits."""
    per = f"{step.seq_len} tokens" if step.sequences == 1 else f"{step.sequences} sequences of {step.seq_len} tokens"
    line = (
        f"a training step needs about {size(need.total)} ({size(need.activations)} of activations for "
        f"{need.batch} {'sequences' if step.sequences == 1 else 'examples'} of {per} per forward, "
        f"{size(need.weights + need.gradients + need.optimizer)} of weights, gradients and Adam state), "
        f"more than the {size(limit)} available ({source})"
    )
    fits = fitting_micro_batch(step, per_rank, limit)
    if fits is not None:
        return line + f"; --micro-batch-size {fits} fits (gradient accumulation keeps --batch-size)"
    return line + "; even one sequence per forward does not fit: use a smaller --preset or --seq-len"


def preflight(
    step: Step, micro_batch: int, per_rank: int, device: torch.device, resident: int = 0, share: int = 1
) -> StepMemory:
    """Refuses (UserError, one line) a step whose estimate exceeds what `device` has; returns
    the estimate. `resident`: bytes of the estimate already allocated there (the weights of a
    model built on that device), which the available memory no longer counts; `share`:
    processes that split the available memory."""
    need = step.peak(micro_batch)
    free, source = available(device)
    limit = free // share + resident
    source += f", shared by {share} processes" if share > 1 else ""
    if need.total > limit:
        raise UserError(refusal(step, need, limit, source, per_rank))
    return need


def check_model(
    model: torch.nn.Module, cfg: TrainConfig, seq_len: int, dist: DistEnv, sequences: int = 1
) -> StepMemory:
    """The preflight for a GPT1 `model` trained with `cfg` on samples of `sequences` sequences
    of `seq_len` tokens by the job `dist`; every process raises the same UserError (rank 0 says
    it) when one of them would not fit. CPU processes of a job on one machine (torchrun's
    LOCAL_WORLD_SIZE) share its memory."""
    micro, _ = batch_layout(cfg, dist.world_size)
    bf16 = autocast_dtype(cfg, dist.device) is not None
    step = Step(model.config, seq_len, model.fused, bf16, dist.device.type, cfg.prefetch, sequences)
    on_device = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == dist.device.type)
    share = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.device.type == "cpu" else 1
    need, problem = step.peak(micro), None
    try:
        preflight(step, micro, cfg.batch_size // dist.world_size, dist.device, resident=on_device, share=share)
    except UserError as e:
        problem = str(e)
    if dist.distributed:
        said: list[str | None] = [None] * dist.world_size
        torch.distributed.all_gather_object(said, problem)
        problem = next((p for p in said if p is not None), None)
    if problem is not None:
        raise UserError(problem, echo=dist.is_main)
    return need
