"""Definite pronoun resolution (DPRD, Rahman & Ng 2012) and Winograd-style files, for the zero-
shot heuristic: substitute each candidate for the pronoun and compare the LM's likelihood of
what follows.

Two layouts:

* DPRD's text files (``train.c.txt``, ``test.c.txt``): blocks of four lines — the sentence, the
  pronoun, the two candidates separated by a comma, the correct candidate — then a blank line;
* JSONL, one object per line: ``{"sentence", "pronoun", "candidates": [..], "answer"}``.

Each becomes an ``Example`` with ``segments = (text before the pronoun, text after it)``,
``choices`` = the candidates and ``label`` = the correct one's index.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.data.records import Example, fail, jsonl_rows, require_file


def split_at_pronoun(
    sentence: str, pronoun: str, candidates: tuple[str, ...], path: Path, line: int
) -> tuple[str, str]:
    """(before, after) around the pronoun: its first whole-word occurrence after the first
    mention of a candidate (the pronoun refers back), else its first occurrence."""
    found = [m for m in re.finditer(rf"\b{re.escape(pronoun)}\b", sentence, flags=re.IGNORECASE)]
    if not found:
        raise fail(path, line, f"pronoun {pronoun!r} does not occur in {sentence!r}")
    mentions = [sentence.lower().find(c.lower()) for c in candidates]
    first_mention = min((m for m in mentions if m >= 0), default=-1)
    after = [m for m in found if m.start() > first_mention] or found
    m = after[0]
    return sentence[: m.start()], sentence[m.end() :]


def _example(
    uid: str, sentence: str, pronoun: str, candidates: list[str], answer: str, path: Path, line: int
) -> Example:
    candidates = [c.strip() for c in candidates]
    if len(candidates) < 2 or not all(candidates):
        raise fail(path, line, f"expected at least two candidates, got {candidates!r}")
    lowered = [c.lower() for c in candidates]
    if answer.strip().lower() not in lowered:
        raise fail(path, line, f"answer {answer!r} is not one of the candidates {candidates!r}")
    before, after = split_at_pronoun(sentence.strip(), pronoun.strip(), tuple(candidates), path, line)
    return Example(uid, (before, after), tuple(candidates), lowered.index(answer.strip().lower()))


def read_dprd_text(path: Path) -> list[Example]:
    lines = require_file(path).read_text(encoding="utf-8").splitlines()
    out, block, start = [], [], 1
    for n, line in enumerate(lines + [""], start=1):
        if line.strip():
            if not block:
                start = n
            block.append(line)
            continue
        if not block:
            continue
        if len(block) != 4:
            raise fail(
                path, start, f"a DPRD example has 4 lines (sentence, pronoun, candidates, answer), got {len(block)}"
            )
        sentence, pronoun, candidates, answer = block
        out.append(_example(f"{path.name}:{start}", sentence, pronoun, candidates.split(","), answer, path, start))
        block = []
    return out


def read_winograd_jsonl(path: Path) -> list[Example]:
    out = []
    for n, row in jsonl_rows(path):
        missing = [k for k in ("sentence", "pronoun", "candidates", "answer") if k not in row]
        if missing:
            raise fail(path, n, f"missing field(s) {', '.join(missing)}")
        if not isinstance(row["candidates"], list):
            raise fail(path, n, "candidates must be a list of strings")
        out.append(
            _example(
                str(row.get("id", f"{path.name}:{n}")),
                row["sentence"],
                row["pronoun"],
                row["candidates"],
                row["answer"],
                path,
                n,
            )
        )
    return out


def read_winograd(path: Path) -> list[Example]:
    """A DPRD text file or a JSONL file (by extension)."""
    return read_winograd_jsonl(path) if path.suffix == ".jsonl" else read_dprd_text(path)
