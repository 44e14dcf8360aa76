"""Readers for the sentence and sentence-pair tasks: GLUE's TSVs, SNLI and SciTail.

Layouts, as published (one directory per task, e.g. ``glue_data/CoLA``):

    CoLA     train/dev: NO header; source, label, original label, sentence. test: index, sentence
    SST-2    sentence, label                               test: index, sentence
    MRPC     Quality, #1 ID, #2 ID, #1 String, #2 String   test: index, #1 ID, ...
    QQP      id, qid1, qid2, question1, question2, is_duplicate     test: id, question1, question2
    STS-B    index, genre, ..., sentence1, sentence2, score (0-5)   test: without score
    MNLI     index, ..., sentence1, sentence2, label1, [label2-5,] gold_label
             dev_matched.tsv, dev_mismatched.tsv, test_matched.tsv, test_mismatched.tsv
    QNLI     index, question, sentence, label
    RTE/WNLI index, sentence1, sentence2, label
    SNLI     snli_1.0_{train,dev,test}.jsonl (or .txt, tab-separated with a header, or GLUE's
             MNLI-style train/dev/test.tsv); gold_label '-' marks pairs without annotator
             consensus, which SNLI's own evaluation leaves out — so do we
    SciTail  tsv_format/scitail_1.0_{train,dev,test}.tsv: NO header; premise, hypothesis,
             label (entails / neutral)

Every file is split on tabs only: GLUE text holds unbalanced quote characters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.data.records import (
    Example,
    TsvTable,
    class_index,
    fail,
    jsonl_rows,
    require_file,
    score,
    tsv_lines,
)

BINARY = ("0", "1")
NLI3 = ("contradiction", "entailment", "neutral")
NLI2 = ("entailment", "not_entailment")


@dataclass(frozen=True)
class GlueLayout:
    """Where a GLUE task's columns and files are."""

    text: tuple[str, ...]  # header names of the text columns, in input order
    label: str  # header name of the label column (absent from test files)
    labels: tuple[str, ...] = BINARY  # label values as written; () for a score
    id_column: str = "index"  # the id a GLUE submission echoes (test files; train may lack it)
    dev: dict[str, str] = field(default_factory=lambda: {"dev": "dev.tsv"})
    test: dict[str, str] = field(default_factory=lambda: {"test": "test.tsv"})


GLUE: dict[str, GlueLayout] = {
    "sst2": GlueLayout(("sentence",), "label"),
    "mrpc": GlueLayout(("#1 String", "#2 String"), "Quality"),
    "qqp": GlueLayout(("question1", "question2"), "is_duplicate", id_column="id"),
    "stsb": GlueLayout(("sentence1", "sentence2"), "score", labels=()),
    "mnli": GlueLayout(
        ("sentence1", "sentence2"),
        "gold_label",
        NLI3,
        dev={"matched": "dev_matched.tsv", "mismatched": "dev_mismatched.tsv"},
        test={"matched": "test_matched.tsv", "mismatched": "test_mismatched.tsv"},
    ),
    "qnli": GlueLayout(("question", "sentence"), "label", NLI2),
    "rte": GlueLayout(("sentence1", "sentence2"), "label", NLI2),
    "wnli": GlueLayout(("sentence1", "sentence2"), "label"),
}
STSB_RANGE = (0.0, 5.0)


def read_glue_tsv(path: Path, layout: GlueLayout, labelled: bool) -> list[Example]:
    """One GLUE file with a header. Test files (``labelled=False``) may lack the label column;
    train and dev files must have it."""
    table = TsvTable(path)
    has_label = table.has(layout.label)
    if labelled and not has_label:
        table.require(layout.label)
    id_col = layout.id_column if table.has(layout.id_column) else None
    columns = [*layout.text, *([layout.label] if has_label else []), *([id_col] if id_col else [])]
    out = []
    for n, values in table.rows(columns):
        texts = tuple(values[: len(layout.text)])
        label: int | float | None = None
        if has_label:
            raw = values[len(layout.text)]
            label = class_index(layout.labels, raw, path, n) if layout.labels else score(raw, *STSB_RANGE, path, n)
        uid = values[-1].strip() if id_col else f"{path.name}:{n}"
        out.append(Example(uid, texts, label=label))
    return out


def read_cola(path: Path, labelled: bool) -> list[Example]:
    """CoLA train/dev: no header, 4 columns (source, label, original label or blank, sentence).
    CoLA test: a header (index, sentence)."""
    if not labelled:
        return read_glue_tsv(path, GlueLayout(("sentence",), "label"), labelled=False)
    out = []
    for n, fields in tsv_lines(path):
        if len(fields) != 4:
            raise fail(
                path,
                n,
                f"{len(fields)} tab-separated fields; CoLA rows have 4 (source, label, original label, sentence)",
            )
        out.append(Example(f"{path.name}:{n}", (fields[3],), label=class_index(BINARY, fields[1], path, n)))
    return out


def read_glue(task: str, data_dir: Path, split: str) -> dict[str, list[Example]]:
    """{set name: examples} of one split ('train', 'dev' or 'test') of a GLUE task. A missing
    test file yields {}; a missing train or dev file is an error."""
    layout = GLUE.get(task, GlueLayout(("sentence",), "label"))
    files = {"train": {"train": "train.tsv"}, "dev": layout.dev, "test": layout.test}[split]
    labelled = split != "test"
    out = {}
    for name, file in files.items():
        path = data_dir / file
        if not labelled and not path.is_file():
            continue
        require_file(path)
        out[name] = read_cola(path, labelled) if task == "cola" else read_glue_tsv(path, layout, labelled)
    return out


# ---- SNLI ----------------------------------------------------------------------------------

SNLI_NO_CONSENSUS = "-"


def _snli_label(raw: str, path: Path, n: int) -> int | None:
    raw = raw.strip()
    return None if raw == SNLI_NO_CONSENSUS else class_index(NLI3, raw, path, n)


def read_snli_file(path: Path) -> list[Example]:
    """snli_1.0_*.jsonl, snli_1.0_*.txt or GLUE's SNLI *.tsv; pairs without consensus dropped."""
    out = []
    if path.suffix == ".jsonl":
        for n, row in jsonl_rows(path):
            missing = [k for k in ("sentence1", "sentence2", "gold_label") if not isinstance(row.get(k), str)]
            if missing:
                raise fail(path, n, f"missing field(s) {missing}")
            label = _snli_label(row["gold_label"], path, n)
            if label is not None:
                out.append(
                    Example(
                        str(row.get("pairID", f"{path.name}:{n}")), (row["sentence1"], row["sentence2"]), label=label
                    )
                )
        return out
    table = TsvTable(path)
    for n, (a, b, raw) in table.rows(["sentence1", "sentence2", "gold_label"]):
        label = _snli_label(raw, path, n)
        if label is not None:
            out.append(Example(f"{path.name}:{n}", (a, b), label=label))
    return out


def read_snli(data_dir: Path, split: str) -> dict[str, list[Example]]:
    candidates = [data_dir / f"snli_1.0_{split}.{ext}" for ext in ("jsonl", "txt")] + [data_dir / f"{split}.tsv"]
    for path in candidates:
        if path.is_file():
            return {split: read_snli_file(path)}
    if split == "test":
        return {}
    raise FileNotFoundError(f"task file not found: {candidates[0]} (nor {', '.join(p.name for p in candidates[1:])})")


# ---- SciTail -------------------------------------------------------------------------------

SCITAIL_LABELS = ("entails", "neutral")


def read_scitail_file(path: Path) -> list[Example]:
    out = []
    for n, fields in tsv_lines(path):
        if len(fields) != 3:
            raise fail(path, n, f"{len(fields)} tab-separated fields; SciTail rows have 3 (premise, hypothesis, label)")
        out.append(
            Example(f"{path.name}:{n}", (fields[0], fields[1]), label=class_index(SCITAIL_LABELS, fields[2], path, n))
        )
    return out


def read_scitail(data_dir: Path, split: str) -> dict[str, list[Example]]:
    """data_dir is SciTailV1.1 (holding tsv_format/) or the tsv_format directory itself."""
    base = data_dir / "tsv_format" if (data_dir / "tsv_format").is_dir() else data_dir
    path = base / f"scitail_1.0_{split}.tsv"
    if split == "test" and not path.is_file():
        return {}
    return {split: read_scitail_file(require_file(path))}
