"""The paper's input transformations (§3.3): every task becomes token sequences that end in
the extract token, whose final hidden state the task head reads.

    classification   [start] text [extract]
    entailment       [start] premise [delim] hypothesis [extract]
    similarity       [start] A [delim] B [extract]  and  [start] B [delim] A [extract]
    regression       the similarity layout (STS-B), a scalar head
    multiple_choice  [start] context [delim] answer_k [extract]   for each choice k
                     (RACE: context = article question)

Too long for the context: tokens come off the end of the longest segment, one at a time (on a
tie, the earlier segment loses first) until the sequence fits; the special tokens are never
dropped. Sequences are right-padded with the pad token: under causal attention a pad after
the extract token cannot change it, and pads get LM label -100, so no attention mask is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from engine.data.records import Example
from engine.model.heads import KINDS
from engine.model.tokenizer import BPETokenizer, SpecialTokens

IGNORE_INDEX = -100


def truncate_longest_first(segments: Sequence[Sequence[int]], budget: int) -> list[list[int]]:
    """Cuts tokens off the end of the longest segment (the earlier on a tie) until the total
    length is at most ``budget``. Computed in one pass: every segment longer than a cap L is
    cut to L, and the last r of those keep one more token, r being what the budget has left."""
    if budget < 0:
        raise ValueError(f"truncation budget must be >= 0, got {budget}")
    lengths = [len(s) for s in segments]
    if sum(lengths) <= budget:
        return [list(s) for s in segments]
    # water-filling over the lengths in increasing order: a segment that fits under an even
    # share of what is left stays whole; the rest share the remainder evenly
    remaining, cap = budget, 0
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for rank, i in enumerate(order):
        share = len(order) - rank
        if lengths[i] * share > remaining:
            cap = remaining // share
            break
        remaining -= lengths[i]
    spare = budget - sum(min(n, cap) for n in lengths)
    over = [i for i, n in enumerate(lengths) if n > cap]
    keep = {i: cap + (1 if k >= len(over) - spare else 0) for k, i in enumerate(over)}
    return [list(s[: keep.get(i, len(s))]) for i, s in enumerate(segments)]


def transform(
    kind: str,
    segments: Sequence[Sequence[int]],
    choices: Sequence[Sequence[int]],
    sp: SpecialTokens,
    max_len: int,
) -> list[list[int]]:
    """The token sequences of one example (token ids in, token ids out; see the module doc).
    ``segments``: (text,) or (a, b); for multiple choice the context pieces; ``choices``: the
    answers (multiple choice only). Every sequence is at most ``max_len`` tokens."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
    single = kind == "classification"
    want = 1 if single else 2
    if kind == "multiple_choice":
        if not choices or not segments:
            raise ValueError("a multiple-choice example needs context segments and at least one choice")
    elif len(segments) != want or choices:
        raise ValueError(
            f"a {kind} example has {want} text segment(s) and no choices, got {len(segments)} and {len(choices)}"
        )
    specials = 2 if single else 3  # start, [delim,] extract
    if max_len < specials + 1:
        raise ValueError(f"max_len {max_len} leaves no room for text after {specials} special tokens")
    budget = max_len - specials
    start, delim, extract = [sp.start], [sp.delimiter], [sp.classify]

    if kind == "multiple_choice":
        out = []
        for choice in choices:
            *context, answer = truncate_longest_first([*segments, choice], budget)
            out.append(start + [t for piece in context for t in piece] + delim + answer + extract)
        return out
    if single:
        (a,) = truncate_longest_first(segments, budget)
        return [start + a + extract]
    a, b = truncate_longest_first(segments, budget)
    first = start + a + delim + b + extract
    if kind == "entailment":
        return [first]
    return [first, start + b + delim + a + extract]  # similarity, regression: both orders


@dataclass(frozen=True)
class Encoded:
    """One example after the transformation: S sequences (1, the 2 orders, or one per choice)."""

    sequences: tuple[tuple[int, ...], ...]
    label: int | float | None


class InputTransform:
    """Tokenises Examples and applies ``transform``. The tokenizer must carry the special
    tokens (``BPETokenizer.add_special_tokens``)."""

    def __init__(self, tokenizer: BPETokenizer, kind: str, max_len: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
        self.tokenizer, self.kind, self.max_len = tokenizer, kind, max_len
        self.sp = tokenizer.special_tokens()

    def __call__(self, examples: Sequence[Example]) -> list[Encoded]:
        texts = sorted({t for ex in examples for t in (*ex.segments, *ex.choices)})
        ids = dict(zip(texts, self.tokenizer.encode_batch(texts)))  # each distinct text once (RACE articles repeat)
        return [
            Encoded(
                tuple(
                    tuple(s)
                    for s in transform(
                        self.kind, [ids[t] for t in ex.segments], [ids[t] for t in ex.choices], self.sp, self.max_len
                    )
                ),
                ex.label,
            )
            for ex in examples
        ]


@dataclass
class Batch:
    """input_ids, lm_labels: (B, S, T) right-padded; extract: (B, S) position of the extract
    token; labels: (B,) class / choice index (long) or score (float), None when unlabelled."""

    input_ids: Tensor
    extract: Tensor
    lm_labels: Tensor
    labels: Tensor | None

    def as_dict(self) -> dict[str, Tensor | None]:
        """The keyword arguments of GPT1ForTask.forward (what engine.training.trainer moves and pins)."""
        return {
            "input_ids": self.input_ids,
            "extract": self.extract,
            "labels": self.labels,
            "lm_labels": self.lm_labels,
        }


def collate(items: Sequence[Encoded], pad_id: int) -> Batch:
    """Pads a batch to its longest sequence; pad positions get LM label -100."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    S = len(items[0].sequences)
    if any(len(e.sequences) != S for e in items):
        raise ValueError(
            "examples in a batch must have the same number of sequences, "
            f"got {sorted({len(e.sequences) for e in items})}"
        )
    T = max(len(s) for e in items for s in e.sequences)
    ids = torch.full((len(items), S, T), pad_id, dtype=torch.long)
    lm = torch.full((len(items), S, T), IGNORE_INDEX, dtype=torch.long)
    extract = torch.empty((len(items), S), dtype=torch.long)
    for i, e in enumerate(items):
        for j, s in enumerate(e.sequences):
            ids[i, j, : len(s)] = lm[i, j, : len(s)] = torch.tensor(s)
            extract[i, j] = len(s) - 1
    labels = None
    if all(e.label is not None for e in items):
        float_labels = any(isinstance(e.label, float) for e in items)
        labels = torch.tensor([e.label for e in items], dtype=torch.float32 if float_labels else torch.long)
    return Batch(ids, extract, lm, labels)
