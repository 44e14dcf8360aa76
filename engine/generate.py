"""`python -m engine.generate RUN --prompt TEXT`: sample text from a run's model.

    python -m engine.generate runs/pretrain --prompt "to be, or not to be"
    python -m engine.generate runs/pretrain --prompt "o romeo" --num-samples 3 --temperature 0.8 --top-k 40
    python -m engine.generate runs/pretrain --prompt "the king" --temperature 0    # greedy

The run's own tokenizer encodes the prompt (no special tokens added) and decodes the result;
the model decodes with its KV cache (GPT1.generate_stream), and each token is written to
stdout as soon as it is drawn. Each sample is the decoded prompt and its continuation (the
tokenizer lower-cases, so the prompt reads as the model saw it), ending in a newline; several
samples are separated by a line holding only "---". --seed makes sampling reproducible.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from engine.cli import ArgumentParser, run_cli
from engine.inference.runs import (
    add_run_arg,
    add_runtime_args,
    inference_device,
    load_language_model,
)
from engine.model.gpt1 import GPT1
from engine.model.tokenizer import BPETokenizer

DEFAULT_NEW_TOKENS = 100
SEPARATOR = "---"


def _top_k(text: str) -> int | None:
    if text.lower() == "none":
        return None
    return int(text)


_top_k.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m engine.generate", description="Sample text from a run's model, streamed to stdout."
    )
    add_run_arg(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"tokens to sample after the prompt (default: {DEFAULT_NEW_TOKENS}, or what the context has room for)",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy (default: 0.8)")
    p.add_argument(
        "--top-k", type=_top_k, default=40, help="sample among the K most likely tokens; 'none' for all (default: 40)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default: 0)")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw, one after the other (default: 1)")
    add_runtime_args(p)
    return p


def check_args(temperature: float, top_k: int | None, num_samples: int, max_new_tokens: int | None) -> None:
    """Each bad value named by its flag (GPT1.generate would name the argument instead)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be a positive integer or 'none', got {top_k}")
    if num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {num_samples}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")


def new_tokens(requested: int | None, prompt_len: int, n_positions: int) -> int:
    """How many tokens to sample: what was asked for, if the context has room for it."""
    room = n_positions - prompt_len
    if room < 1:
        raise ValueError(
            f"--prompt is {prompt_len} tokens; the model's context (n_positions) is {n_positions}: shorten it"
        )
    if requested is None:
        return min(DEFAULT_NEW_TOKENS, room)
    if requested > room:
        raise ValueError(
            f"--max-new-tokens {requested}: the {prompt_len}-token prompt leaves room for at most {room} "
            f"(n_positions={n_positions})"
        )
    return requested


@dataclass
class Sampler:
    """A model and its tokenizer writing samples as they are drawn."""

    model: GPT1
    tokenizer: BPETokenizer
    temperature: float = 1.0
    top_k: int | None = None

    def stream(
        self, ids: Sequence[int], max_new_tokens: int, generator: torch.Generator, write: Callable[[str], None]
    ) -> list[int]:
        """Writes the decoded prompt, then each new piece of text as its token arrives; returns
        every id. The text decoded so far is a prefix of the next decode (the BPE decoder only
        turns a token's end-of-word marker into a space once another token follows), so writing
        the difference reproduces tokenizer.decode of the whole sample."""
        device = self.model.tokens_embed.weight.device
        tokens = list(ids)
        shown = self.tokenizer.decode(tokens)
        write(shown)
        prompt = torch.tensor([tokens], device=device)
        for step in self.model.generate_stream(prompt, max_new_tokens, self.temperature, self.top_k, generator):
            tokens.append(int(step.item()))
            text = self.tokenizer.decode(tokens)
            if text.startswith(shown):
                write(text[len(shown) :])
                shown = text
        write("\n")
        return tokens


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args.temperature, args.top_k, args.num_samples, args.max_new_tokens)
    device = inference_device(args.device, args.fused)
    model, tokenizer = load_language_model(args.run, device, args.fused)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError(f"--prompt {args.prompt!r} encodes to no tokens; give it some text")
    n = new_tokens(args.max_new_tokens, len(ids), model.config.n_positions)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sampler = Sampler(model, tokenizer, args.temperature, args.top_k)
    try:
        for i in range(args.num_samples):
            if i:
                _write(SEPARATOR + "\n")
            sampler.stream(ids, n, generator, _write)
    except BrokenPipeError:  # `| head` closed the pipe: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(run_cli(main))
