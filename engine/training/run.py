"""A run directory: its exclusive lock, its saved configuration (train_config.json) and the one
resume policy, shared by every training program through engine.training.launch.

The lock is held for the run's lifetime (a second run on the same --out fails at once naming
the holder's pid); a killed run's leftovers are cleaned once the lock is ours. On --resume only
RUN_CONTROL settings may change; everything else (tokenizer, kernels, model, optimisation) is
the run's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch

from engine.cli import UserError, flag_name
from engine.fileio import atomic_write_text
from engine.model.tokenizer import BPETokenizer, load_tokenizer
from engine.training import checkpoint
from engine.training.checkpoint import RUN_CONFIG
from engine.training.distributed import DistEnv

T = TypeVar("T")

LOCK_FILE = ".run.lock"
# What --resume may change: where and how the run runs and reports, never what it computes.
RUN_CONTROL = frozenset(
    {
        "max_steps",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "prefetch",
        "compile",
        "device",
        "peak_tflops",
        "max_bad_steps",
        "micro_batch_size",  # the same global batch, accumulated as this machine's memory allows
        "zero1",  # checkpoints are whole: ZeRO-1 is how a run holds its optimizer state, not what it computes
        "cache_dir",
        "eval_windows",
        "final_eval_windows",
        "sample_tokens",
        "prompt",
        "eval_batch_size",
    }
)


def check_fused(fused: bool, device: torch.device) -> None:
    """The fused path on a CPU needs the C++ kernels: say so before any work, not mid-run."""
    if fused and device.type == "cpu":
        from engine import ops

        reason = ops.cpu_kernels_error()
        if reason is not None:
            raise UserError(f"--fused: {reason} (or pass --no-fused)")


# ---- the run directory and its lock ----------------------------------------------------------------


class RunLock:
    """An exclusive flock on <run_dir>/.run.lock, which records the holder's pid. The
    kernel drops it when the process dies, so a killed run never leaves the directory locked."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.created_dir = False
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"--out {self.run_dir} exists and is not a directory")
        self.created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(
                    f"{self.run_dir} is in use by another run (pid {holder}); wait for it to end or pass another --out"
                ) from None
            if self._is_current(fd):  # not a lock file a finishing run just removed
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _is_current(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self, *, remove_empty_dir: bool = False) -> None:
        """Unlocks; `remove_empty_dir` also removes the lock file, and the directory when this
        lock created it, if nothing else is there (a run that failed before writing anything
        leaves no trace)."""
        if self._fd is None:
            return
        try:
            if remove_empty_dir and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
                self.path.unlink()
                if self.created_dir:
                    self.run_dir.rmdir()
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.release(remove_empty_dir=exc_type is not None)


@contextlib.contextmanager
def locked_run_dir(out: Path, dist: DistEnv) -> Iterator[None]:
    """Holds the run directory's lock (rank 0 takes it for the job) and cleans a killed
    run's leftovers once it is ours."""
    lock = RunLock(out) if dist.is_main else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except UserError as e:
            error = str(e)
    error = _from_rank0(error, dist)
    if error is not None:
        raise UserError(error, echo=dist.is_main)  # rank 0 prints it, once for the job
    ok = False
    try:
        if lock is not None:
            checkpoint.clean_run_dir(out)  # a killed run's leftovers, now that the directory is ours
        dist.barrier()
        yield
        ok = True
    finally:
        if lock is not None:
            lock.release(remove_empty_dir=not ok)


def _from_rank0(value: str | None, dist: DistEnv) -> str | None:
    if not dist.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ---- the saved configuration and the resume policy -----------------------------------------------


def save_run_config(out: Path, kind: str, sections: dict[str, Any]) -> None:
    """train_config.json: which CLI wrote the run and every resolved setting, by section."""
    data = {
        "kind": kind,
        **{k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in sections.items()},
    }
    atomic_write_text(out / RUN_CONFIG, json.dumps(data, indent=2) + "\n")


def read_run_config(run_dir: Path, kind: str) -> dict[str, Any]:
    """The saved configuration of the run in `run_dir`, which `kind`'s CLI must have written."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: no {RUN_CONFIG} there (not a run directory)")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: not a run configuration (expected a JSON object)")
    found = saved.get("kind")
    if found is None:
        raise UserError(
            f'{path} has no "kind": written by an engine older than this one, which cannot resume it; '
            "start a new run (--init takes a run directory's weights)"
        )
    if found != kind:
        ours = found in ("pretrain", "finetune")
        who = f"python -m engine.{found}" if ours else "no CLI of this engine"
        hint = f"; resume it with python -m engine.{found} --resume {run_dir}" if ours else ""
        raise UserError(f"{path} was written by {who}, not engine.{kind}{hint}")
    return saved


def build_section(cls: Callable[..., T], values: object, path: Path, section: str) -> T:
    """cls(**values); a bad saved value becomes an error naming the file."""
    if not isinstance(values, dict):
        raise UserError(f"{path}: no {section!r} section (written by an older version of the engine?)")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None


def resume_sections(
    run_dir: Path, kind: str, given: dict[str, dict[str, Any]], classes: dict[str, Callable[..., Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one resume policy: the saved sections with the flags given now applied, refusing
    any given flag outside RUN_CONTROL that differs from the saved value. Returns (built
    sections, the raw saved file)."""
    saved = read_run_config(run_dir, kind)
    changed = sorted(
        k
        for section, flags in given.items()
        for k, v in flags.items()
        if k not in RUN_CONTROL and isinstance(saved.get(section), dict) and saved[section].get(k, v) != v
    )
    if changed:
        raise UserError(
            f"--resume cannot change {', '.join(flag_name(c) for c in changed)} (saved in {run_dir / RUN_CONFIG}); "
            "only run-control flags such as --max-steps may change; start a new run instead"
        )
    path, built = run_dir / RUN_CONFIG, {}
    for section, cls in classes.items():
        values = saved.get(section)
        if isinstance(values, dict):
            values = {**values, **given.get(section, {})}
        built[section] = build_section(cls, values, path, section)
    return built, saved


def finished_step(resume_from: Path, max_steps: int, done_marker: Path) -> int | None:
    """The step a resumed run already finished at (its last checkpoint is at max_steps and
    the CLI's final output exists), else None: a finished run is left exactly as it is."""
    if not done_marker.exists():
        return None
    name = resume_from.name  # checkpoints/step_<step>: no need to read a 1.4 GB trainer state
    step = (
        int(name.removeprefix("step_"))
        if name.startswith("step_") and name[5:].isdigit()
        else int(checkpoint.load_trainer_state(resume_from)["step"])
    )
    return step if step >= max_steps else None


def own_tokenizer(run_dir: Path) -> BPETokenizer:
    """A run's own tokenizer.json: part of the run (its ids are what the weights were trained on)."""
    path = run_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: a run's tokenizer is part of the run (a new BPE could give other ids)")
    return load_tokenizer(path)
