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
dropped. Each encoded example says how many tokens it lost (``Encoded.truncated``), and
``InputReport`` sums that up with the examples whose text is empty (kept: they are read from
the special tokens alone) into the note the CLIs print. Sequences are right-padded with the
pad token: under causal attention a pad after the extract token cannot change it, and pads get
LM label -100, so no attention mask is needed.
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


def n_specials(kind: str) -> int:
    """Special tokens in each sequence of `kind`: start, [delimiter,] extract."""
    return 2 if kind == "classification" else 3


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
    specials = n_specials(kind)
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
    """One example after the transformation: S sequences (1, the 2 orders, or one per choice);
    `truncated`: tokens cut to fit max_len (the most any of its sequences lost)."""

    sequences: tuple[tuple[int, ...], ...]
    label: int | float | None
    truncated: int = 0


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
        return [self._encode([ids[t] for t in ex.segments], [ids[t] for t in ex.choices], ex.label) for ex in examples]

    def _encode(self, segments: list[list[int]], choices: list[list[int]], label: int | float | None) -> Encoded:
        sequences = transform(self.kind, segments, choices, self.sp, self.max_len)
        text = sum(map(len, segments))
        wanted = [text + len(c) for c in choices] if choices else [text] * len(sequences)
        cut = max(w + n_specials(self.kind) - len(s) for w, s in zip(wanted, sequences))
        return Encoded(tuple(tuple(s) for s in sequences), label, cut)


@dataclass(frozen=True)
class InputReport:
    """What the transformation did to a set of examples: how many were cut to max_len and by
    how much, and which have an empty text (a segment or choice of whitespace only), which are
    counted and kept, not refused (a GLUE test set needs a prediction for every id)."""

    examples: int
    truncated: int  # examples cut
    tokens_cut: int  # in all
    most_cut: int  # from one example
    empty: tuple[str, ...]  # uids

    @classmethod
    def of(cls, examples: Sequence[Example], cut: Sequence[int]) -> "InputReport":
        """`cut`: tokens cut from each example (Encoded.truncated)."""
        empty = tuple(ex.uid for ex in examples if not all(t.strip() for t in (*ex.segments, *ex.choices)))
        return cls(len(examples), sum(c > 0 for c in cut), sum(cut), max(cut, default=0), empty)

    def as_dict(self) -> dict[str, int]:
        return {
            "examples": self.examples,
            "truncated": self.truncated,
            "tokens_cut": self.tokens_cut,
            "most_cut": self.most_cut,
            "empty": len(self.empty),
        }

    def note(self, what: str, max_len: int) -> str | None:
        """One line for stderr ("2 of 9 inputs are longer ..."), or None when nothing happened."""
        parts = []
        if self.truncated:
            are = "is" if self.truncated == 1 else "are"
            parts.append(
                f"{self.truncated:,} of {self.examples:,} {what} {are} longer than max_len {max_len} and "
                f"{'was' if are == 'is' else 'were'} cut to it (by up to {self.most_cut:,} tokens, "
                f"{self.tokens_cut:,} in all; the end of the longest text goes first)"
            )
        if self.empty:
            shown = ", ".join(self.empty[:3]) + (", ..." if len(self.empty) > 3 else "")
            has = "has" if len(self.empty) == 1 else "have"
            parts.append(
                f"{len(self.empty):,} of {self.examples:,} {what} {has} an empty text ({shown}): "
                "kept, read from the special tokens alone"
            )
        return "; ".join(parts) or None


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
