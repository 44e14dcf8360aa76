"""Processes and devices: this process's place in a torchrun job (DistEnv), joining and leaving it
(a stated timeout; the rendezvous scoped to torchrun's restart round; a failing process says so in
one line naming its rank), the device a run resolves to, and how a global batch splits into
micro-batches per process."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator

import torch

from engine.cli import UserError
from engine.training.config import TrainConfig

TIMEOUT = timedelta(minutes=30)
"""How long a collective, and joining the job, waits for the other processes before it fails (gloo
and NCCL alike; torch's gloo default, NCCL's is 10 minutes). A process that dies is seen sooner:
gloo's sockets close at once, and torchrun stops the job. This bounds one that hangs; it also
bounds rank 0 preparing data while the others wait (prepare big corpora with --prepare-only)."""


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
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=TIMEOUT, **_round_store(rank, world))
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def _round_store(rank: int, world: int) -> dict:
    """init_process_group's store under torchrun's shared store: its keys scoped to this restart round.

    torchrun (c10d rendezvous, torch >= 2.5) gives every restart round the same TCPStore, its
    agent's, while torch's env:// init assumes a fresh one each round: every round publishes each
    rank's address under the same keys, so a rank that joins before its peer reads the address
    of the peer's dead predecessor (gloo: connectFullMesh, connection refused; NCCL: a stale
    unique id). TORCHELASTIC_RESTART_COUNT names the round on one node; on several nodes torchrun
    counts per node (pytorch#108158), hence TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 there (a fresh
    store per round; this then does nothing)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}  # env://: rank 0 hosts a new store
    _warn_if_nodes_restart(rank)
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=TIMEOUT
    )
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": torch.distributed.PrefixStore(f"gpt1/restart_{restart}", store), "rank": rank, "world_size": world}


def _warn_if_nodes_restart(rank: int) -> None:
    """The scoping above needs one restart count for the whole job, which torchrun keeps per node."""
    nodes, restarts = (
        int(os.environ.get("GROUP_WORLD_SIZE", "1")),
        int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")),
    )
    if rank == 0 and nodes > 1 and restarts > 0:
        print(
            f"warning: torchrun --max-restarts {restarts} on {nodes} nodes: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
            "for every torchrun, or a restarted round may wait out the timeout (torchrun counts restarts per node)",
            file=sys.stderr,
            flush=True,
        )


class ProcessFailed(OSError):
    """A process of a multi-process job failed with what would otherwise be a traceback (its own
    error, or a collective with a peer that is gone): one line naming its rank and the cause, exit
    code 1 like the environment's other faults (engine.cli.run_cli)."""


@contextlib.contextmanager
def joined(device: str = "auto") -> Iterator[DistEnv]:
    """setup_distributed, then teardown_distributed: after a normal exit waiting for every process,
    after an error not. On a multi-process job, an error that engine.cli.run_cli would show as a
    traceback leaves as ProcessFailed ("rank R of W: <type>: <message>"); GPT1_DEBUG=1 shows both."""
    try:
        yield setup_distributed(device)
        teardown_distributed(sync=True)
    except BaseException as e:
        teardown_distributed()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or not isinstance(e, Exception) or isinstance(e, (UserError, ValueError, OSError)):
            raise  # one process, an interrupt, or already one line
        raise ProcessFailed(f"rank {os.environ.get('RANK', '?')} of {world}: {_cause(e)}") from e


def _cause(e: Exception) -> str:
    """An exception as one printable line: its type and the first line of its message."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    text = "".join(c for c in first if c.isprintable())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


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


def micro_batches(rank: int, micro: int, accum: int) -> list[tuple[int, int]]:
    """(start, count) of this process's micro-batches in an update's global batch: processes take
    consecutive blocks of accum × micro samples, so sample i of update s is the same on any number
    of processes (the run's (s · batch_size + i)-th window): a run resumed on another number of
    processes continues the data order from the global count of windows consumed."""
    return [((rank * accum + m) * micro, micro) for m in range(accum)]
