"""Processes and devices: this process's place in a torchrun job (DistEnv), joining and leaving it,
the device a run resolves to, and how a global batch splits into micro-batches per process."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from engine.cli import UserError
from engine.training.config import TrainConfig


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
