"""What every task reader produces, and the strict file readers they share.

A reader turns one file of a published data set into a list of ``Example``s. Files are read
the way they were written: GLUE's TSVs split on tabs only (their text holds unbalanced quote
characters, so a CSV quoting rule would merge or drop rows), real CSVs (ROCStories, SWAG)
with the csv module. Any row that does not fit — a missing field, a label outside the task's
label set — is a ``TaskDataError`` naming the file and the line.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence


class TaskDataError(ValueError):
    """A task file that cannot be read as its published layout: names the file and line."""


@dataclass(frozen=True)
class Example:
    """One labelled (or unlabelled) example, before tokenisation.

    uid: where it came from — the file's own id column where it has one (GLUE test files:
    the ``index`` that a submission must echo), else ``file:line``.
    segments: the input texts: (text,) for a single sentence, (a, b) for a pair; for multiple
    choice the context pieces that go before the delimiter (RACE: (article, question)).
    choices: the candidate answers (multiple choice only).
    label: class index, choice index or score; None where the file has no labels.
    """

    uid: str
    segments: tuple[str, ...]
    choices: tuple[str, ...] = ()
    label: int | float | None = None


def fail(path: Path | str, line: int | None, message: str) -> TaskDataError:
    where = f"{path}:{line}" if line is not None else str(path)
    return TaskDataError(f"{where}: {message}")


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    return path


def _read_text(path: Path) -> str:
    require_file(path)
    try:
        return path.read_bytes().decode("utf-8-sig")  # a BOM (Excel-saved CSVs) is not data
    except UnicodeDecodeError as e:
        raise fail(path, None, f"not UTF-8 text ({e})") from None


def tsv_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of each non-empty line, split on '\\t' only.

    Lines end at '\\n' alone ('\\r\\n' tolerated): str.splitlines would also split inside a
    sentence at '\\x1c', '\\u2028', a lone '\\r' and other separators GLUE text can hold."""
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.removesuffix("\r")
        if line:
            yield n, line.split("\t")


class TsvTable:
    """A tab-separated file with a header row, addressed by column name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lines = tsv_lines(path)
        first = next(lines, None)
        if first is None:
            raise fail(path, None, "file is empty (expected a header row)")
        self.header = [name.strip() for name in first[1]]
        self._rows = lines

    def has(self, *columns: str) -> bool:
        return all(c in self.header for c in columns)

    def require(self, *columns: str) -> None:
        missing = [c for c in columns if c not in self.header]
        if missing:
            raise fail(self.path, 1, f"header lacks column(s) {missing}; found {self.header}")

    def rows(self, columns: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
        """(line, [value of each column]) per data row. A row may not have more fields than
        the header; it may have fewer only where the missing ones are not asked for.
        A column that is the header's last is read as the row's last field (GLUE's
        MNLI/SNLI rows carry a varying number of annotator labels before gold_label)."""
        self.require(*columns)
        width, last = len(self.header), self.header[-1]
        index = {c: self.header.index(c) for c in columns}
        # fields a row needs before its last one, for the columns read by position
        before_last = max((index[c] for c in columns if c != last), default=-1) + 1
        for n, fields in self._rows:
            if len(fields) > width:
                raise fail(self.path, n, f"{len(fields)} tab-separated fields, the header has {width}")
            values = []
            for c in columns:
                present = len(fields) > before_last if c == last else index[c] < len(fields)
                if not present:
                    raise fail(self.path, n, f"missing field {c!r} (row has {len(fields)} of {width} fields)")
                values.append(fields[-1] if c == last else fields[index[c]])
            yield n, values


def _csv_reader(path: Path):
    return csv.reader(io.StringIO(_read_text(path), newline=""))


def csv_header(path: Path) -> list[str]:
    try:
        return [h.strip() for h in next(_csv_reader(path))]
    except StopIteration:
        raise fail(path, None, "file is empty (expected a header row)") from None
    except csv.Error as e:
        raise fail(path, 1, f"malformed CSV ({e})") from None


def csv_rows(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line of the row's start, {column: value}) for a real comma-separated file with a
    header (quoted fields may hold commas and newlines)."""
    header = csv_header(path)
    reader = _csv_reader(path)
    next(reader)
    missing = [c for c in columns if c not in header]
    if missing:
        raise fail(path, 1, f"header lacks column(s) {missing}; found {header}")
    index = {c: header.index(c) for c in columns}
    line = reader.line_num
    try:
        for fields in reader:
            start, line = line + 1, reader.line_num
            if not fields or fields == [""]:
                continue
            if len(fields) != len(header):
                raise fail(path, start, f"{len(fields)} comma-separated fields, the header has {len(header)}")
            yield start, {c: fields[i] for c, i in index.items()}
    except csv.Error as e:
        raise fail(path, reader.line_num, f"malformed CSV ({e})") from None


def json_problem(e: json.JSONDecodeError) -> str:
    """json's message with its column ("expecting value at column 5"): e.msg alone stops at
    "... at"; a raw control character gets what to do about it."""
    text = f"{e.msg.removesuffix(' at')} at column {e.colno}"
    if e.msg.startswith("Invalid control character"):
        text += ": a tab, newline or other control character inside a string must be escaped, e.g. \\t"
    return text[0].lower() + text[1:]


def json_file(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise fail(path, e.lineno, f"not valid JSON ({json_problem(e)})") from None


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.removesuffix("\r"))
        except json.JSONDecodeError as e:
            raise fail(path, n, f"not a JSON object ({json_problem(e)})") from None
        if not isinstance(row, dict):
            raise fail(path, n, f"expected a JSON object, got {type(row).__name__}")
        yield n, row


def class_index(labels: Sequence[str], value: str, path: Path, line: int) -> int:
    """The index of a label as written in the file; anything else is an error."""
    try:
        return labels.index(value.strip())
    except ValueError:
        raise fail(path, line, f"label {value!r} is not one of {list(labels)}") from None


def score(value: str, low: float, high: float, path: Path, line: int) -> float:
    try:
        x = float(value)
    except ValueError:
        raise fail(path, line, f"score {value!r} is not a number") from None
    if not low <= x <= high:
        raise fail(path, line, f"score {x} is outside [{low}, {high}]")
    return x
