"""`python -m engine.zeroshot`: the paper's §5 zero-shot heuristics — the pretrained language
model alone, no fine-tuning, scored by average per-token log-probability.

    python -m engine.zeroshot runs/pretrain                                 # shakespeare-cloze
    python -m engine.zeroshot runs/pretrain --task sst2 --data-dir glue_data/SST-2
    python -m engine.zeroshot runs/pretrain --task shakespeare-cloze shakespeare-order --checkpoints

Heuristics (Radford et al., 2018, §5 "Zero-shot behaviours"):

* SST-2: append "very" to the sentence and compare the likelihood of "positive" vs "negative".
* CoLA: the sentence's average token log-probability, thresholded (the threshold that
  maximises Matthews correlation on the training file when the data has one, else the dev
  median; the paper does not say which).
* RACE, Story Cloze, SWAG, the embedded Shakespeare tasks (multiple choice): the answer with
  the highest average token log-probability given the document (and question).
* DPRD / Winograd (``--task dprd``): substitute each candidate for the pronoun and compare the
  average log-probability of the rest of the sentence after the substitution.

``--checkpoints`` evaluates every checkpoint of a pretraining run and plots the curve against
the update step (the paper's Fig. 2, right) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from engine import cli
from engine.data.records import Example
from engine.inference.metrics import accuracy, matthews

if TYPE_CHECKING:
    from engine.model.gpt1 import GPT1
    from engine.model.tokenizer import BPETokenizer

MC_TASKS = ("rocstories", "race", "race-middle", "race-high", "swag", "shakespeare-cloze", "shakespeare-order")
TASKS = ("sst2", "cola", "dprd", *MC_TASKS)
DPRD_FILES = ("test.c.txt", "test.jsonl", "dev.jsonl")
SENTIMENT_WORDS = ("negative", "positive")  # GLUE SST-2: label 0, 1


# ---- scoring ------------------------------------------------------------------------------


def _fit(context: list[int], cont: list[int], n_positions: int) -> tuple[list[int], list[int]]:
    """Keeps the continuation whole (up to n_positions − 1 tokens) and the end of the context."""
    cont = cont[: n_positions - 1]
    return context[-(n_positions - len(cont)) :], cont


@torch.no_grad()
def average_logprobs(model: GPT1, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16) -> list[float]:
    """For each (context ids, continuation ids): the mean over the continuation's tokens of
    log p(token | everything before it). The context must hold at least one token; an empty
    continuation scores -inf. Only the continuation's positions go through the LM head."""
    device = model.tokens_embed.weight.device
    scores: list[float] = []
    for k in range(0, len(pairs), batch_size):
        chunk = [_fit(c, a, model.config.n_positions) for c, a in pairs[k : k + batch_size]]
        if any(not c for c, _ in chunk):
            raise ValueError("average_logprobs: every context needs at least one token")
        T = max(len(c) + len(a) for c, a in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        targets = torch.full((len(chunk), T), -100, dtype=torch.long)
        for i, (c, a) in enumerate(chunk):
            ids[i, : len(c) + len(a)] = torch.tensor(c + a)
            targets[i, len(c) - 1 : len(c) + len(a) - 1] = torch.tensor(a, dtype=torch.long)  # t predicts t+1
        ids, targets = ids.to(device), targets.to(device)
        h = model(ids, return_logits=False).hidden_states  # (B, T, C)
        where = targets != -100
        logp = (h[where].float() @ model.tokens_embed.weight.float().t()).log_softmax(-1)  # (n, V)
        tok = torch.zeros_like(targets, dtype=torch.float32)
        tok[where] = logp.gather(-1, targets[where][:, None])[:, 0]
        n = where.sum(1)
        mean = tok.sum(1) / n.clamp(min=1)
        scores.extend(torch.where(n > 0, mean, torch.full_like(mean, -math.inf)).tolist())
    return scores


def choice_scores(
    model: GPT1, tokenizer: BPETokenizer, contexts: Sequence[str], choices: Sequence[Sequence[str]]
) -> list[list[float]]:
    """Average log-probability of each choice after its context: one list per example."""
    pairs, sizes = [], []
    for ctx, options in zip(contexts, choices):
        c = tokenizer.encode(ctx)
        pairs.extend((c, tokenizer.encode(" " + o)) for o in options)
        sizes.append(len(options))
    flat = average_logprobs(model, pairs)
    out, i = [], 0
    for n in sizes:
        out.append(flat[i : i + n])
        i += n
    return out


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


# ---- the heuristics -------------------------------------------------------------------------


@dataclass
class Result:
    task: str
    metric: str
    value: float
    n: int
    chance: float
    heuristic: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def multiple_choice(model: GPT1, tokenizer: BPETokenizer, task: str, examples: list[Example]) -> Result:
    scores = choice_scores(model, tokenizer, [" ".join(e.segments) for e in examples], [e.choices for e in examples])
    pred = [_argmax(s) for s in scores]
    n_choices = len(examples[0].choices)
    return Result(
        task,
        "accuracy",
        accuracy(pred, [e.label for e in examples]),
        len(examples),
        1 / n_choices,
        "choice with the highest average token log-probability given the context",
    )


def sentiment(model: GPT1, tokenizer: BPETokenizer, task: str, examples: list[Example]) -> Result:
    scores = choice_scores(
        model, tokenizer, [e.segments[0] + " very" for e in examples], [SENTIMENT_WORDS] * len(examples)
    )
    pred = [_argmax(s) for s in scores]
    return Result(
        task,
        "accuracy",
        accuracy(pred, [int(e.label) for e in examples]),
        len(examples),
        0.5,
        '"very" appended; "positive" vs "negative", the likelier wins',
    )


def sentence_scores(model: GPT1, tokenizer: BPETokenizer, sentences: Sequence[str]) -> list[float]:
    """Average log-probability of each sentence's tokens after its first."""
    pairs = []
    for s in sentences:
        ids = tokenizer.encode(s) or [0]
        pairs.append((ids[:1], ids[1:]))
    return [s if math.isfinite(s) else 0.0 for s in average_logprobs(model, pairs)]


def best_threshold(scores: Sequence[float], labels: Sequence[int]) -> float:
    """The cut (predict acceptable above it) with the highest Matthews correlation."""
    cuts = sorted(set(scores))
    mids = [cuts[0] - 1.0] + [(a + b) / 2 for a, b in zip(cuts, cuts[1:])]
    return max(mids, key=lambda t: matthews([int(s > t) for s in scores], labels))


def acceptability(
    model: GPT1, tokenizer: BPETokenizer, task: str, examples: list[Example], train: list[Example] | None
) -> Result:
    scores = sentence_scores(model, tokenizer, [e.segments[0] for e in examples])
    if train:
        threshold = best_threshold(
            sentence_scores(model, tokenizer, [e.segments[0] for e in train]), [int(e.label) for e in train]
        )
        how = "threshold fitted on the training file"
    else:
        threshold = sorted(scores)[len(scores) // 2]
        how = "threshold at the dev median"
    pred = [int(s > threshold) for s in scores]
    return Result(
        task,
        "matthews",
        matthews(pred, [int(e.label) for e in examples]),
        len(examples),
        0.0,
        f"average token log-probability, {how}",
    )


def winograd(model: GPT1, tokenizer: BPETokenizer, task: str, examples: list[Example]) -> Result:
    pairs, sizes = [], []
    for e in examples:
        before, after = e.segments
        pairs.extend((tokenizer.encode(before + c), tokenizer.encode(after)) for c in e.choices)
        sizes.append(len(e.choices))
    flat, pred, i = average_logprobs(model, pairs), [], 0
    for n in sizes:
        pred.append(_argmax(flat[i : i + n]))
        i += n
    return Result(
        task,
        "accuracy",
        accuracy(pred, [e.label for e in examples]),
        len(examples),
        1 / sizes[0],
        "each candidate for the pronoun; the likelier rest of the sentence wins",
    )


# ---- data -----------------------------------------------------------------------------------


def load_examples(
    task: str, data_dir: Path | None, split: str, max_examples: int | None
) -> tuple[list[Example], list[Example] | None]:
    """(examples to score, training examples for CoLA's threshold or None)."""
    if task not in TASKS:
        raise ValueError(f"unknown zero-shot task {task!r}; expected one of {', '.join(TASKS)}")
    if task == "dprd":
        examples = _read_dprd(data_dir)
        train = None
    else:
        from engine.data.tasks import get_task

        t = get_task(task)
        sets = t.load(data_dir, split)
        examples = next(iter(sets.values()))
        train = None
        if task == "cola" and data_dir is not None and (Path(data_dir) / "train.tsv").is_file():
            train = t.load(data_dir, "train")["train"][: max_examples or None]
    if not examples or any(e.label is None for e in examples):
        raise ValueError(f"{task}: the {split} set needs labelled examples")
    return examples[: max_examples or None], train


def _read_dprd(data_dir: Path | None) -> list[Example]:
    from engine.data.winograd import read_winograd

    if data_dir is None:
        raise ValueError(
            "--task dprd reads your files: pass --data-dir (a DPRD test.c.txt, a .jsonl, or their directory)"
        )
    path = Path(data_dir)
    if path.is_dir():
        found = [path / f for f in DPRD_FILES if (path / f).is_file()]
        if not found:
            raise FileNotFoundError(f"no {' / '.join(DPRD_FILES)} in {path}")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"--data-dir not found: {path}")
    return read_winograd(path)


def evaluate(
    model: GPT1,
    tokenizer: BPETokenizer,
    task: str,
    data_dir: Path | None = None,
    split: str = "dev",
    max_examples: int | None = None,
) -> Result:
    """One task's zero-shot score for a loaded model (in eval mode) and its tokenizer."""
    examples, train = load_examples(task, data_dir, split, max_examples)
    model.eval()
    if task == "sst2":
        return sentiment(model, tokenizer, task, examples)
    if task == "cola":
        return acceptability(model, tokenizer, task, examples, train)
    if task == "dprd":
        return winograd(model, tokenizer, task, examples)
    return multiple_choice(model, tokenizer, task, examples)


# ---- runs and checkpoints ---------------------------------------------------------------------


def load_model(path: Path, fused: bool, device: torch.device) -> GPT1:
    from engine.model.gpt1 import GPT1

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no model (config.json + model.safetensors)")
    return GPT1.from_pretrained(path, fused=fused).to(device).eval()


def checkpoints_of(run: Path) -> list[tuple[int, Path]]:
    """(update step, directory) of every checkpoint of a run that holds weights, oldest first."""
    root = run / "checkpoints"
    found = []
    for p in sorted(root.glob("step_*")) if root.is_dir() else []:
        if (p / "config.json").is_file() and p.name.removeprefix("step_").isdigit():
            found.append((int(p.name.removeprefix("step_")), p))
    return sorted(found)


def plot_curve(curve: list[dict[str, Any]], tasks: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine.fileio import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in tasks:
        pts = [(r["step"], r[t]["value"]) for r in curve if t in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=f"{t} ({curve[0][t]['metric']})")
            ax.axhline(curve[0][t]["chance"], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("pretraining update")
    ax.set_ylabel("zero-shot score (dotted: chance)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


# ---- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m engine.zeroshot", description="The paper's zero-shot heuristics (§5) on a pretrained run."
    )
    p.add_argument("run", help="a run directory (config.json + model.safetensors + tokenizer.json)")
    p.add_argument(
        "--task",
        nargs="+",
        default=["shakespeare-cloze"],
        help=f"one or more of: {', '.join(TASKS)} (default: shakespeare-cloze)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="the task's files in their published layout (embedded tasks need none); dprd: a file or its directory",
    )
    p.add_argument("--split", default="dev", choices=("dev", "test"), help="which split to score (default: dev)")
    p.add_argument("--max-examples", type=int, default=None, help="score at most N examples per task")
    p.add_argument(
        "--checkpoints", action="store_true", help="score every checkpoint of the run and plot the curve (Fig. 2 right)"
    )
    p.add_argument(
        "--out", default=None, help="where --checkpoints writes zeroshot.json and zeroshot.png (default: RUN/zeroshot)"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda when available")
    p.add_argument(
        "--fused", action=argparse.BooleanOptionalAction, default=None, help="fused kernels (default: when available)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def _resolve_fused(flag: bool | None, device: torch.device) -> bool:
    if device.type == "cuda":
        return flag is not False
    from engine import ops

    err = ops.cpu_kernels_error()
    if flag and err:
        raise cli.UserError(f"--fused: {err} (or pass --no-fused)")
    return err is None if flag is None else flag


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_examples is not None and args.max_examples <= 0:
        raise ValueError(f"--max-examples must be positive, got {args.max_examples}")
    for t in args.task:
        if t not in TASKS:
            raise ValueError(f"unknown zero-shot task {t!r}; expected one of {', '.join(TASKS)}")
    from engine.model.tokenizer import load_tokenizer
    from engine.training.distributed import resolve_device

    run = Path(args.run)
    device = resolve_device(args.device)
    fused = _resolve_fused(args.fused, device)
    tokenizer = load_tokenizer(run)
    data_dir = Path(args.data_dir) if args.data_dir else None
    sources = checkpoints_of(run) if args.checkpoints else [(None, run)]
    if not sources:
        raise FileNotFoundError(f"--checkpoints: no checkpoints with weights in {run / 'checkpoints'}")
    curve = []
    for step, path in sources:
        model = load_model(path, fused, device)
        row: dict[str, Any] = {"step": step, "path": str(path)}
        for t in args.task:
            row[t] = evaluate(model, tokenizer, t, data_dir, args.split, args.max_examples).as_dict()
        curve.append(row)
        if not args.json:
            where = f"update {step}" if step is not None else str(path)
            print(
                f"{where}: "
                + "; ".join(
                    f"{t} {row[t]['metric']} {row[t]['value']:.4f} (n={row[t]['n']}, chance {row[t]['chance']:.3f})"
                    for t in args.task
                ),
                flush=True,
            )
    if args.checkpoints:
        from engine.fileio import atomic_write_text

        out = Path(args.out) if args.out else run / "zeroshot"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "zeroshot.json", json.dumps(curve, indent=2) + "\n")
        plot_curve(curve, args.task, out / "zeroshot.png")
        if not args.json:
            print(f"curve: {out / 'zeroshot.json'}, {out / 'zeroshot.png'}")
    if args.json:
        print(json.dumps(curve if args.checkpoints else curve[0], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
