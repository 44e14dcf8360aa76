"""A finished run, loaded for inference: its model, its tokenizer, the device they run on.

Shared by the CLIs that use a run rather than train one (`engine.generate`,
`engine.evaluate`, `engine.predict`): the same run-directory checks, the same `--device` and
`--fused` flags, the same one-line errors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from engine.model.gpt1 import GPT1
from engine.model.tokenizer import BPETokenizer, load_tokenizer
from engine.training.distributed import resolve_device
from engine.training.run import check_fused

DEFAULT_RUN = "runs/pretrain"  # where `python -m engine.pretrain` writes without --out
RUN_HINT = (
    "a run directory holding config.json + model.safetensors + tokenizer.json (as `python -m engine.pretrain` writes)"
)


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """--device and --fused/--no-fused, as the training CLIs spell them."""
    g = parser.add_argument_group("where it runs")
    g.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="cpu, cuda, or auto (cuda when available) (default: auto)",
    )
    g.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run on the fused kernels (C++ on CPU, Triton on CUDA) instead of the PyTorch reference (default: fused)",
    )


def add_run_arg(parser: argparse.ArgumentParser) -> None:
    """RUN, optional: the default pretraining run."""
    parser.add_argument(
        "run",
        nargs="?",
        default=DEFAULT_RUN,
        help=f"the run directory (config.json + model.safetensors + tokenizer.json) (default: {DEFAULT_RUN})",
    )


def run_dir(run: str | Path) -> Path:
    """`run` as a Path, once it is seen to hold a model; else a FileNotFoundError saying what a run is."""
    path = Path(run)
    if str(run) == DEFAULT_RUN and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no run at {DEFAULT_RUN}: make one with `python -m engine.pretrain --fused`, or pass RUN"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; expected {RUN_HINT}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; expected {RUN_HINT}")
    return path


def inference_device(device: str, fused: bool) -> torch.device:
    """The device `--device` names; the fused path on CPU needs the C++ kernels, said up front."""
    dev = resolve_device(device)
    check_fused(fused, dev)
    return dev


def load_language_model(run: str | Path, device: torch.device, fused: bool) -> tuple[GPT1, BPETokenizer]:
    """(model in eval mode on `device`, tokenizer) of a run; a tokenizer producing ids the
    model has no embedding for is refused here, not as an index error mid-generation."""
    path = run_dir(run)
    tokenizer = load_tokenizer(path)
    model = GPT1.from_pretrained(path, fused=fused)
    V = model.config.vocab_size
    if tokenizer.vocab_size > V:
        raise ValueError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {V} embedding rows"
        )
    return model.to(device).eval(), tokenizer
