"""A run directory and its checkpoints: the layout, the weights format, the trainer state
(read with torch.load(weights_only=True) only), the refusal to overwrite, and the RNG state
that makes a resumed run continue bit for bit."""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .cli import UserError
from .fileio import atomic_write

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"
RUN_CONFIG = "train_config.json"
LOSS_PLOT = "loss.png"
# Files whose presence means "this directory already holds a run".
RUN_MARKERS = (RUN_CONFIG, CHECKPOINTS, METRICS, "model.safetensors")


@dataclass
class WeightsIO:
    """How a checkpoint stores the model's weights. `save(model, dir)` must write atomically
    (engine.fileio); `load(model, dir)` loads them into the model in place."""

    save: Callable[[nn.Module, Path], None]
    load: Callable[[nn.Module, Path], None]


def _gpt1_save(model: nn.Module, path: Path) -> None:
    model.save_pretrained(path)


def _gpt1_load(model: nn.Module, path: Path) -> None:
    from .hf import load_pretrained

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
    from .model import GPT1

    return GPT1_WEIGHTS if isinstance(model, GPT1) else STATE_DICT_WEIGHTS


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a directory is renamed into place only
    once every file in it is written, so partial ones are never listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's trainer state, read with torch.load(weights_only=True)."""
    path = Path(checkpoint) / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {TRAINER_STATE} in {checkpoint}") from None
    except Exception as e:  # pickle/zip errors come in many types
        raise ValueError(f"{path} could not be read with torch.load(weights_only=True): {e}") from None


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
    for name in RUN_MARKERS + (LOSS_PLOT, "config.json", "tokenizer.json", "samples.txt", "tensorboard"):
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
