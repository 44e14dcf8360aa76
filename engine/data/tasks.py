"""The task registry: every task the fine-tuning CLI knows, by its lower-case GLUE-style name.

A ``Task`` says how to read a split of the task's files (``read(data_dir, split)`` → {set name:
examples}), which input transformation it uses (``kind``), its label set, the metrics the
paper reports for it (the first one picks the best checkpoint), and, for GLUE, the file name of
each test set in GLUE's submission format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from engine.data import choice, embedded_tasks, glue
from engine.data.records import Example

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # an engine.data.transforms.KINDS entry
    read: Callable[[Path, str], dict[str, list[Example]]]
    metrics: tuple[str, ...] = ("accuracy",)
    labels: tuple[str, ...] = ()  # class names as written in the files (classification-like kinds)
    n_choices: int = 0  # multiple choice
    submission: dict[str, str] = field(default_factory=dict)  # test set name -> GLUE submission file
    embedded: bool = False  # derived from the packaged corpus: needs no --data-dir
    about: str = ""

    @property
    def n_labels(self) -> int:
        return len(self.labels) if self.labels else 1

    def load(self, data_dir: Path | None, split: str) -> dict[str, list[Example]]:
        """{set name: examples} for split 'train', 'dev' or 'test' ({} when a task has no test
        file). Files are checked here: missing ones raise FileNotFoundError, bad rows
        TaskDataError."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if data_dir is None and not self.embedded:
            raise ValueError(f"task {self.name!r} reads your files: pass --data-dir (the directory holding them)")
        if data_dir is not None and not Path(data_dir).is_dir():
            raise FileNotFoundError(f"data directory not found: {data_dir}")
        sets = self.read(Path(data_dir) if data_dir is not None else None, split)
        for name, examples in sets.items():
            if not examples and split != "test":
                raise ValueError(f"task {self.name!r}: the {split} set {name!r} has no examples")
        return sets


def _glue(name: str, kind: str, metrics: tuple[str, ...], submission: dict[str, str], about: str) -> Task:
    layout = glue.GLUE.get(name, glue.GlueLayout(("sentence",), "label"))
    return Task(name, kind, partial(glue.read_glue, name), metrics, layout.labels, submission=submission, about=about)


_TASKS = [
    _glue(
        "cola", "classification", ("matthews", "accuracy"), {"test": "CoLA.tsv"}, "GLUE CoLA: grammatical acceptability"
    ),
    _glue("sst2", "classification", ("accuracy",), {"test": "SST-2.tsv"}, "GLUE SST-2: sentiment"),
    _glue("mrpc", "similarity", ("f1", "accuracy"), {"test": "MRPC.tsv"}, "GLUE MRPC: paraphrase"),
    _glue("qqp", "similarity", ("f1", "accuracy"), {"test": "QQP.tsv"}, "GLUE QQP: duplicate questions"),
    _glue("stsb", "regression", ("pearson", "spearman"), {"test": "STS-B.tsv"}, "GLUE STS-B: similarity score 0-5"),
    _glue(
        "mnli",
        "entailment",
        ("accuracy",),
        {"matched": "MNLI-m.tsv", "mismatched": "MNLI-mm.tsv"},
        "GLUE MNLI: dev matched and mismatched",
    ),
    _glue("qnli", "entailment", ("accuracy",), {"test": "QNLI.tsv"}, "GLUE QNLI: question answering as entailment"),
    _glue("rte", "entailment", ("accuracy",), {"test": "RTE.tsv"}, "GLUE RTE: entailment"),
    _glue("wnli", "entailment", ("accuracy",), {"test": "WNLI.tsv"}, "GLUE WNLI: Winograd as entailment"),
    Task("snli", "entailment", glue.read_snli, labels=glue.NLI3, about="SNLI 1.0 (jsonl, txt or GLUE tsv)"),
    Task("scitail", "entailment", glue.read_scitail, labels=glue.SCITAIL_LABELS, about="SciTail 1.1 tsv_format"),
    Task(
        "rocstories",
        "multiple_choice",
        choice.read_story_cloze,
        n_choices=2,
        about="Story Cloze Test (ROCStories) CSVs",
    ),
    Task("race", "multiple_choice", choice.read_race, n_choices=4, about="RACE, middle and high"),
    Task("race-middle", "multiple_choice", partial(choice.read_race, levels=("middle",)), n_choices=4, about="RACE-m"),
    Task("race-high", "multiple_choice", partial(choice.read_race, levels=("high",)), n_choices=4, about="RACE-h"),
    Task("swag", "multiple_choice", choice.read_swag, n_choices=4, about="SWAG train/val/test CSVs"),
    Task(
        embedded_tasks.CLOZE,
        "multiple_choice",
        embedded_tasks.read_cloze,
        n_choices=embedded_tasks.N_CHOICES,
        embedded=True,
        about="embedded: Shakespeare passage → its true next line among candidates",
    ),
    Task(
        embedded_tasks.ORDER,
        "multiple_choice",
        partial(embedded_tasks.read_cloze, distractor="shuffled"),
        n_choices=embedded_tasks.N_CHOICES,
        embedded=True,
        about="embedded: Shakespeare passage → its true next line vs the same words reordered",
    ),
    Task(
        embedded_tasks.GENRE,
        "classification",
        embedded_tasks.read_genre,
        labels=embedded_tasks.GENRES,
        embedded=True,
        about="embedded: Shakespeare passage → comedy / history / tragedy",
    ),
]
TASKS: dict[str, Task] = {t.name: t for t in _TASKS}
DEFAULT_TASK = embedded_tasks.DEFAULT


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}") from None
