"""A run directory and its checkpoints: the layout, the weights format, the trainer state
(read with torch.load(weights_only=True) only), the refusal to overwrite, and the RNG state
that makes a resumed run continue bit for bit.

A checkpoint is ``checkpoints/step_<8 digits>/``: the weights (WeightsIO), trainer_state.pt
(Trainer.state_dict()) and checkpoint.json, which records whether it was saved from a
finite state ("good") and every file's size, so a truncated file is seen without reading
it. Resuming falls back from an unreadable checkpoint to the newest good one that reads."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from engine.cli import UserError
from engine.fileio import (
    TMP_SUFFIX,
    atomic_write,
    atomic_write_stream,
    atomic_write_text,
    fsync_dir,
    make_temp_dir,
    with_path,
)

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_META = "checkpoint.json"  # {"step", "good", "bad_steps", "files": {name: bytes}}
TRASH_SUFFIX = ".trash"
_STEP = re.compile(r"step_\d{8,}")
METRICS = "metrics.jsonl"
RUN_CONFIG = "train_config.json"
LOSS_PLOT = "loss.png"
# Files whose presence means "this directory already holds a run": one that took an update.
# A run that failed before its first one (out of memory, bad data) wrote only train_config.json
# and tokenizer.json, nothing to resume or keep: its --out is reused without --overwrite.
RUN_MARKERS = (CHECKPOINTS, METRICS, "model.safetensors")


@dataclass
class WeightsIO:
    """How a checkpoint stores the model's weights. `save(model, dir)` must write atomically
    (engine.fileio); `load(model, dir)` loads them into the model in place."""

    save: Callable[[nn.Module, Path], None]
    load: Callable[[nn.Module, Path], None]


def _gpt1_save(model: nn.Module, path: Path) -> None:
    model.save_pretrained(path)


def _gpt1_load(model: nn.Module, path: Path) -> None:
    from engine.model.gpt1 import load_pretrained

    config, state = load_pretrained(path)
    if config != model.config:
        raise ValueError(f"{path}: checkpoint config {config} differs from the model's {model.config}")
    model.load_state_dict(state)


def _state_dict_save(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    atomic_write(path / "model.safetensors", lambda tmp: save_model(model, str(tmp)))


def _state_dict_load(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))


GPT1_WEIGHTS = WeightsIO(_gpt1_save, _gpt1_load)
"""GPT1 weights: config.json + model.safetensors in the Hugging Face openai-gpt layout."""
STATE_DICT_WEIGHTS = WeightsIO(_state_dict_save, _state_dict_load)
"""Any module: its whole state_dict in model.safetensors (tied tensors stored once)."""


def default_weights_io(model: nn.Module) -> WeightsIO:
    from engine.model.gpt1 import GPT1

    return GPT1_WEIGHTS if isinstance(model, GPT1) else STATE_DICT_WEIGHTS


# ---- checkpoints: write, list, rotate, read back ----------------------------------------


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    state: dict[str, Any],
    write_weights: Callable[[Path], None],
    *,
    good: bool,
    keep: int,
) -> Path:
    """Writes checkpoints/step_<step>/ (weights, trainer_state.pt, checkpoint.json) into a
    hidden temporary directory, fsynced, then renamed into place; then keeps the newest
    `keep` good checkpoints. One already there for this step (left by a run that went
    further before resuming from an older checkpoint) is replaced. On an OSError (disk full,
    read-only) nothing finished is touched, the temporary is removed and the error names
    the checkpoint."""
    final = checkpoint_dir(run_dir, step)
    try:
        tmp = make_temp_dir(final)
    except OSError as e:
        raise with_path(e, final) from e
    try:
        write_weights(tmp)
        atomic_write_stream(tmp / TRAINER_STATE, lambda f: torch.save(state, f))  # a full disk stays an OSError
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"step": step, "good": good, "bad_steps": int(state.get("bad_steps", 0)), "files": files}
        atomic_write_text(tmp / CHECKPOINT_META, json.dumps(meta, indent=1) + "\n")
        fsync_dir(tmp)
        if final.exists():
            remove_checkpoint(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as e:
        raise type(e)(e.errno, f"{e.strerror or e} (writing checkpoint)", str(final)) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rotate_checkpoints(run_dir, keep)
    return final


def list_checkpoints(run_dir: str | Path, *, good_only: bool = False) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a directory is renamed into place only
    once every file in it is written, so partial ones are never listed). good_only: only
    those saved from a finite state (see `is_good`)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP.fullmatch(p.name) and (p / TRAINER_STATE).is_file()]
    found.sort(key=lambda p: int(p.name.removeprefix("step_")))
    return [p for p in found if is_good(p)] if good_only else found


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest good checkpoint (never one saved inside a non-finite streak), or None."""
    found = list_checkpoints(run_dir, good_only=True)
    return found[-1] if found else None


def is_good(checkpoint: str | Path) -> bool:
    """Whether a checkpoint was saved from a finite state. Its checkpoint.json says so; one
    without it (written before it existed) is good when its trainer state counted no bad
    steps; one whose record is unreadable counts as good here, so that resuming tries it
    and reports what is wrong with it."""
    meta = _read_meta(Path(checkpoint))
    if isinstance(meta, dict):
        return meta.get("good") is True
    if meta is None:  # no checkpoint.json: an older checkpoint; mmap reads only what is used
        with contextlib.suppress(Exception):
            state = torch.load(Path(checkpoint) / TRAINER_STATE, map_location="cpu", weights_only=True, mmap=True)
            return int(state.get("bad_steps", 0)) == 0
    return True


def rotate_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keeps the newest `keep` good checkpoints whose files are intact and removes every
    other one older than the newest kept: bad or damaged checkpoints count for nothing, so
    they never push a good one out. Newer ones stay (the record of a streak)."""
    usable = [p for p in list_checkpoints(run_dir, good_only=True) if _problem(p) is None]
    kept = usable[-keep:]
    for old in list_checkpoints(run_dir):
        if kept and old not in kept and _step_of(old) < _step_of(kept[-1]):
            remove_checkpoint(old)


def remove_checkpoint(path: Path) -> None:
    """Renames a checkpoint to a hidden trash name, then deletes it: a kill in between
    leaves only ``.step_*.trash``, which clean_run_dir removes, never a half-deleted step_*."""
    trash = path.with_name(f".{path.name}.{os.urandom(4).hex()}{TRASH_SUFFIX}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's trainer state, read with torch.load(weights_only=True)."""
    path = Path(checkpoint) / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {TRAINER_STATE} in {checkpoint}") from None
    except Exception as e:  # pickle/zip errors come in many types
        raise ValueError(f"{path} could not be read with torch.load(weights_only=True): {e}") from None


def load_checkpoint(
    start: str | Path, read_weights: Callable[[Path], None], warn: Callable[[str], None] | None = None
) -> tuple[Path, dict[str, Any]]:
    """Reads the checkpoint `start` (or, given a run directory, its newest good one): calls
    read_weights(dir) and returns (dir, trainer state). When it is unreadable (truncated,
    garbage), falls back to the newest older good one that reads, saying so in one line
    through `warn`; when none does, a UserError naming each with its problem."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    start = Path(start)
    unreadable: list[str] = []
    for ckpt in _resume_candidates(start):
        try:
            problem = _problem(ckpt) if is_good(ckpt) else "saved inside a non-finite streak"
            if problem is not None:
                raise ValueError(problem)
            state = load_trainer_state(ckpt)
            read_weights(ckpt)
        except Exception as e:  # whatever a reader raises, this checkpoint cannot be used
            unreadable.append(f"{ckpt} ({e})")
            continue
        if unreadable:
            warn(f"warning: unreadable checkpoint {'; '.join(unreadable)}; resuming from {ckpt}, the newest that reads")
        return ckpt, state
    if not unreadable:
        raise UserError(f"no good checkpoint found in {_run_of(start) / CHECKPOINTS}")
    raise UserError(f"no readable checkpoint in {_run_of(start) / CHECKPOINTS}: " + "; ".join(unreadable))


def _resume_candidates(start: Path) -> list[Path]:
    """`start` itself (a checkpoint) or a run's newest good one, then the older good ones."""
    if (start / CHECKPOINTS).is_dir() or not _STEP.fullmatch(start.name):
        return list_checkpoints(start, good_only=True)[::-1]
    older = [p for p in list_checkpoints(_run_of(start), good_only=True) if _step_of(p) < _step_of(start)]
    return [start] + older[::-1]


def _problem(ckpt: Path) -> str | None:
    """What makes a checkpoint unusable, as far as its record can tell (missing or truncated
    files), or None. Checkpoints from before the record existed are not checked here."""
    meta = _read_meta(ckpt)
    if meta is None:
        return None if (ckpt / TRAINER_STATE).is_file() else f"no {TRAINER_STATE}"
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        return f"{CHECKPOINT_META} is unreadable"
    for name, size in meta["files"].items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, {size} were written"
    return None


def _read_meta(ckpt: Path) -> Any:
    """checkpoint.json's content; None when absent; ... (Ellipsis) when unreadable."""
    try:
        return json.loads((ckpt / CHECKPOINT_META).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return ...


def _step_of(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step_"))


def _run_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt


# ---- leaks of killed runs ---------------------------------------------------------------------


def clean_run_dir(run_dir: str | Path) -> list[Path]:
    """Removes what killed processes leave in a run directory: atomic-write temporaries
    (``.NAME.*.tmp``, files or directories, in the run directory and checkpoints/), the
    trash of a killed rotation (``checkpoints/.step_*.trash``) and step_* directories
    without their trainer_state.pt (half deleted by older versions). Returns what it
    removed. Call it only while holding the run's lock: another live run's temporaries
    look the same."""
    run_dir = Path(run_dir)
    removed = []
    for root in (run_dir, run_dir / CHECKPOINTS):
        if not root.is_dir():
            continue
        for p in root.iterdir():
            garbage = p.name.startswith(".") and p.name.endswith((TMP_SUFFIX, TRASH_SUFFIX))
            half_deleted = root.name == CHECKPOINTS and _STEP.fullmatch(p.name) and not (p / TRAINER_STATE).is_file()
            if garbage or (half_deleted and p.is_dir()):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def prepare_run_dir(out: str | Path, *, resume: bool, overwrite: bool) -> Path | None:
    """Checks `out` before anything is written; returns the checkpoint to resume from.

    A directory that holds a run (see RUN_MARKERS) is only continued with resume=True or
    cleared with overwrite=True; otherwise a UserError. Call on every rank; only rank 0
    should then call `clear_run_dir`."""
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise UserError(f"--resume {out}: no checkpoint found in {out / CHECKPOINTS}")
        return ckpt
    if holds_run and not overwrite:
        raise UserError(f"{out} already holds a run; pass --resume {out} to continue it or --overwrite to replace it")
    return None


def clear_run_dir(out: str | Path) -> None:
    """Removes a previous run's files from `out` (for --overwrite); other files stay."""
    out = Path(out)
    for name in RUN_MARKERS + (RUN_CONFIG, LOSS_PLOT, "config.json", "tokenizer.json", "samples.txt", "tensorboard"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
