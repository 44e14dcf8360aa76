"""`python -m engine.evaluate RUN --data FILES`: loss and perplexity of text under a run's model.

    python -m engine.evaluate runs/pretrain --data held_out.txt
    python -m engine.evaluate runs/pretrain --data books/ --stride 128 --json
    # {"loss": 4.8123, "perplexity": 123.0, "tokens": 51234}

Each document (a text file; each line of a .jsonl file, its "text" field; directories and
globs expand as for pretraining) is encoded by the run's own tokenizer exactly as it is, no
special tokens added, and scored on its own: every token but the document's first is
predicted once. A document longer than the context is read in windows of n_positions tokens
that start every --stride tokens; each window scores only the tokens no earlier window
scored, so each token is predicted from the most context the stride gives (at least
n_positions - stride tokens once the document is that long). --stride n_positions (the
default) reads disjoint windows; a smaller stride gives more context at n_positions / stride
times the cost. The loss is the mean negative log-likelihood in nats per scored token;
perplexity is exp(loss).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import torch

from engine.cli import ArgumentParser, run_cli
from engine.inference.runs import (
    add_run_arg,
    add_runtime_args,
    inference_device,
    load_language_model,
)
from engine.model.gpt1 import GPT1, IGNORE_INDEX


@dataclass(frozen=True)
class Window:
    """Inputs tokens[begin:end] of one document predict tokens[begin+1:end+1]; the targets
    before `first` were scored by an earlier window."""

    doc: int
    begin: int
    end: int
    first: int


@dataclass(frozen=True)
class Score:
    loss: float  # nats per scored token
    tokens: int  # tokens scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf  # exp overflows past ~709


def windows(doc: int, n_tokens: int, n_positions: int, stride: int) -> list[Window]:
    """The windows of one document of n_tokens tokens (none when it has fewer than 2)."""
    if not 1 <= stride <= n_positions:
        raise ValueError(f"stride must be in [1, n_positions={n_positions}], got {stride}")
    out, scored, begin = [], 0, 0  # targets 1..scored are done
    while scored < n_tokens - 1:
        end = min(begin + n_positions, n_tokens - 1)
        out.append(Window(doc, begin, end, scored + 1))
        scored, begin = end, begin + stride
    return out


@torch.no_grad()
def score_documents(model: GPT1, docs: list[list[int]], stride: int | None = None, batch_size: int = 8) -> Score:
    """Mean NLL (nats/token) of every token of every document but its first, each predicted
    once from the most context `stride` gives (default: disjoint windows of n_positions)."""
    P = model.config.n_positions
    stride = P if stride is None else stride
    device = model.tokens_embed.weight.device
    todo = [w for i, ids in enumerate(docs) for w in windows(i, len(ids), P, stride)]
    if not todo:
        raise ValueError("no tokens to score: every document has fewer than 2 tokens")
    todo.sort(key=lambda w: w.end - w.begin)  # batches of one length: no padding
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in _same_length_batches(todo, batch_size):
            tokens = torch.tensor([docs[w.doc][w.begin : w.end + 1] for w in batch], device=device)  # (B, L + 1)
            targets = tokens[:, 1:].clone()
            for row, w in enumerate(batch):
                targets[row, : w.first - w.begin - 1] = IGNORE_INDEX  # scored by an earlier window
            n = int((targets != IGNORE_INDEX).sum())
            loss = model(tokens[:, :-1], targets=targets).loss  # the mean over the n scored targets
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    return Score(total / count, count)


def _same_length_batches(todo: list[Window], batch_size: int) -> list[list[Window]]:
    out: list[list[Window]] = []
    for w in todo:
        if out and len(out[-1]) < batch_size and out[-1][0].end - out[-1][0].begin == w.end - w.begin:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def read_documents(paths: list[str]) -> list[str]:
    """The texts of --data, unchanged (no Gutenberg stripping): one per text file, one per
    JSONL line."""
    from engine.data.corpus import JSONL_SUFFIXES, read_text_file, resolve_files
    from engine.data.corpus import read_documents as read_jsonl

    texts = []
    for path in resolve_files(paths):
        if path.suffix.lower() in JSONL_SUFFIXES:
            texts += [d.text for d in read_jsonl([path])]
        else:
            texts.append(read_text_file(path))
    return texts


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m engine.evaluate",
        description="Loss (nats/token) and perplexity of text files under a run's model.",
    )
    add_run_arg(p)
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="text files (.txt/.md), .jsonl files, directories or globs",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between window starts, 1..n_positions (default: n_positions, disjoint windows)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--json", action="store_true", help='print {"loss": ..., "perplexity": ..., "tokens": ...}')
    add_runtime_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = inference_device(args.device, args.fused)
    model, tokenizer = load_language_model(args.run, device, args.fused)
    P = model.config.n_positions
    if args.stride is not None and not 1 <= args.stride <= P:
        raise ValueError(f"--stride must be in [1, {P}] (the model's n_positions), got {args.stride}")
    texts = read_documents(args.data)
    docs = tokenizer.encode_batch(texts)
    if sum(max(0, len(d) - 1) for d in docs) == 0:
        raise ValueError(f"--data: no tokens to score (each document needs at least 2 tokens): {' '.join(args.data)}")
    score = score_documents(model, docs, args.stride, args.batch_size)
    if args.json:
        print(json.dumps({"loss": score.loss, "perplexity": score.perplexity, "tokens": score.tokens}))
    else:
        print(
            f"loss {score.loss:.4f} nats/token, perplexity {score.perplexity:.2f} over {score.tokens:,} tokens "
            f"({len(docs)} document(s), window {P}, stride {args.stride or P})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
