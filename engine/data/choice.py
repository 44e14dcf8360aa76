"""Readers for the multiple-choice tasks: the Story Cloze Test (ROCStories), RACE and SWAG.

Layouts, as published:

    Story Cloze  CSVs with a header: InputStoryid, InputSentence1-4, RandomFifthSentenceQuiz1,
                 RandomFifthSentenceQuiz2, AnswerRightEnding (1 or 2; absent from unlabelled
                 test files). The paper trains on the validation file and tests on the test file;
                 as OpenAI's code, a fixed fifth of it (374 of 1,871 stories) is held out as dev.
    RACE         {train,dev,test}/{middle,high}/*.txt, each a JSON object: article, questions,
                 options (4 per question), answers (letters A-D), id
    SWAG         train.csv, val.csv, test.csv (real CSV, quoted fields): sent1, sent2,
                 ending0-3, label (absent from test)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.data.records import (
    Example,
    csv_header,
    csv_rows,
    fail,
    json_file,
    require_file,
)

# ---- Story Cloze Test ----------------------------------------------------------------------

STORY_COLUMNS = [
    "InputStoryid",
    *(f"InputSentence{i}" for i in range(1, 5)),
    "RandomFifthSentenceQuiz1",
    "RandomFifthSentenceQuiz2",
]
STORY_ANSWER = "AnswerRightEnding"
STORY_DEV_FRACTION = 0.2  # OpenAI's code held out 374 of the 1,871 validation stories
# OpenAI's split (datasets.py): sklearn's train_test_split(test_size=374,
# random_state=3535999445), i.e. a NumPy RandomState(seed) permutation, dev = its first 374.
STORY_DEV_SEED = 3535999445


def read_story_cloze_file(path: Path, labelled: bool) -> list[Example]:
    has_answer = labelled or STORY_ANSWER in csv_header(path)
    rows = csv_rows(path, STORY_COLUMNS + ([STORY_ANSWER] if has_answer else []))
    out = []
    for n, row in rows:
        label = None
        if has_answer:
            answer = row[STORY_ANSWER].strip()
            if answer not in ("1", "2"):
                raise fail(path, n, f"{STORY_ANSWER} {answer!r} is not 1 or 2")
            label = int(answer) - 1
        context = " ".join(row[f"InputSentence{i}"].strip() for i in range(1, 5))
        endings = (row["RandomFifthSentenceQuiz1"].strip(), row["RandomFifthSentenceQuiz2"].strip())
        out.append(Example(row["InputStoryid"].strip() or f"{path.name}:{n}", (context,), endings, label))
    return out


def _story_file(data_dir: Path, kind: str) -> Path | None:
    # "cloze_test_val__spring2016 - cloze_test_ALL_val.csv" names "test" too: val wins
    names = {p: p.name.lower() for p in data_dir.glob("*.csv")}
    is_val = {p: "val" in n for p, n in names.items()}
    found = sorted(p for p, n in names.items() if (is_val[p] if kind == "val" else "test" in n and not is_val[p]))
    if len(found) > 1:
        raise ValueError(f"several Story Cloze {kind} files in {data_dir}: {[p.name for p in found]}; keep one")
    return found[0] if found else None


def read_story_cloze(data_dir: Path, split: str) -> dict[str, list[Example]]:
    """train/dev: the validation CSV (``*val*.csv``) less / only its fixed held-out fifth;
    test: the test CSV (``*test*.csv``), labelled or not."""
    if split == "test":
        path = _story_file(data_dir, "test")
        return {"test": read_story_cloze_file(path, labelled=False)} if path else {}
    path = _story_file(data_dir, "val")
    if path is None:
        raise FileNotFoundError(f"task file not found: no Story Cloze validation CSV (*val*.csv) in {data_dir}")
    stories = read_story_cloze_file(path, labelled=True)
    n_dev = round(STORY_DEV_FRACTION * len(stories))
    if not 0 < n_dev < len(stories):
        raise fail(path, None, f"{len(stories)} stories: too few to hold out a fifth as dev")
    order = openai_story_split(len(stories), n_dev)
    return {split: [stories[i] for i in order[split]]}


def openai_story_split(n: int, n_dev: int) -> dict[str, list[int]]:
    """OpenAI's train/dev split of the n validation stories, in its order: what
    ``sklearn.model_selection.train_test_split(range(n), test_size=n_dev, random_state=STORY_DEV_SEED)``
    returns (ShuffleSplit: dev = the permutation's first n_dev, train = the rest)."""
    perm = np.random.RandomState(STORY_DEV_SEED).permutation(n).tolist()
    return {"dev": perm[:n_dev], "train": perm[n_dev:]}


# ---- RACE ----------------------------------------------------------------------------------

RACE_LEVELS = ("middle", "high")
RACE_LETTERS = "ABCD"


def read_race_file(path: Path) -> list[Example]:
    data = json_file(path)
    if not isinstance(data, dict):
        raise fail(path, None, "expected a JSON object with article, questions, options, answers")
    missing = [k for k in ("article", "questions", "options") if k not in data]
    if missing:
        raise fail(path, None, f"missing field(s) {missing}")
    questions, options = data["questions"], data["options"]
    answers = data.get("answers")
    if len(options) != len(questions) or (answers is not None and len(answers) != len(questions)):
        raise fail(
            path,
            None,
            f"{len(questions)} questions but {len(options)} option lists and "
            f"{len(answers) if answers is not None else 'no'} answers",
        )
    uid = str(data.get("id", path.name))
    out = []
    for q, (question, opts) in enumerate(zip(questions, options)):
        if not isinstance(opts, list) or len(opts) != len(RACE_LETTERS):
            raise fail(path, None, f"question {q}: expected {len(RACE_LETTERS)} options, got {opts!r}")
        label = None
        if answers is not None:
            if answers[q] not in RACE_LETTERS:
                raise fail(path, None, f"question {q}: answer {answers[q]!r} is not one of A-D")
            label = RACE_LETTERS.index(answers[q])
        out.append(Example(f"{uid}-{q}", (data["article"], question), tuple(opts), label))
    return out


def read_race(data_dir: Path, split: str, levels: tuple[str, ...] = RACE_LEVELS) -> dict[str, list[Example]]:
    out = []
    for level in levels:
        folder = data_dir / split / level
        if not folder.is_dir():
            if split == "test" and not (data_dir / split).is_dir():
                return {}
            raise FileNotFoundError(f"task directory not found: {folder}")
        files = sorted(folder.glob("*.txt"), key=lambda p: (len(p.stem), p.stem))
        if not files:
            raise FileNotFoundError(f"no RACE *.txt files in {folder}")
        for path in files:
            out.extend(read_race_file(path))
    return {split: out}


# ---- SWAG ----------------------------------------------------------------------------------

SWAG_COLUMNS = ["sent1", "sent2", "ending0", "ending1", "ending2", "ending3"]
SWAG_FILES = {"train": "train.csv", "dev": "val.csv", "test": "test.csv"}


def read_swag_file(path: Path, labelled: bool) -> list[Example]:
    has_label = labelled or "label" in csv_header(path)
    rows = csv_rows(path, SWAG_COLUMNS + (["label"] if has_label else []))
    out = []
    for n, row in rows:
        label = None
        if has_label:
            if row["label"].strip() not in ("0", "1", "2", "3"):
                raise fail(path, n, f"label {row['label']!r} is not one of 0-3")
            label = int(row["label"])
        sent2 = row["sent2"].strip()
        endings = tuple(f"{sent2} {row[f'ending{k}'].strip()}" for k in range(4))
        out.append(Example(f"{path.name}:{n}", (row["sent1"].strip(),), endings, label))
    return out


def read_swag(data_dir: Path, split: str) -> dict[str, list[Example]]:
    path = data_dir / SWAG_FILES[split]
    if split == "test" and not path.is_file():
        return {}
    return {split: read_swag_file(require_file(path), labelled=split != "test")}
