"""Token shards: built once in a stream, reused while corpus and tokenizer are unchanged, rebuilt
otherwise; resumed after an interruption; uint32 past 65,536 tokens; leftovers of killed builds
removed."""

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest

from engine.data import shards as shards_module
from engine.data.corpus import Document, read_documents, shakespeare_files
from engine.data.integrity import DamagedShards
from engine.data.shards import (
    ListSource,
    cache_key,
    file_fingerprint,
    load_or_build_shards,
    open_shards,
    split_at_lines,
    token_dtype,
)
from engine.model.tokenizer import BPETokenizer

TEXTS = ["the cat sat on the mat", "a dog ate the cat's dinner", "to be or not to be", "the end of the story"]


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train(texts=TEXTS * 5, vocab_size=80)


def docs():
    return ListSource([Document(f"d{i}", t) for i, t in enumerate(TEXTS[:3])], [Document("v", TEXTS[3])])


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return docs()


def test_build_then_reuse(tmp_path, tokenizer):
    count = Counter()
    shards, built = load_or_build_shards(tmp_path, {"files": [["a", 1, 2]]}, count, tokenizer)
    assert built and count.calls == 1
    expected_train = [t for d in docs().train for t in tokenizer.encode(d.text)]
    assert shards.train.dtype == np.uint16 and isinstance(shards.train, np.memmap)
    assert shards.train.tolist() == expected_train
    assert shards.val.tolist() == tokenizer.encode(TEXTS[3])
    again, built = load_or_build_shards(tmp_path, {"files": [["a", 1, 2]]}, count, tokenizer)
    assert not built and count.calls == 1  # the documents were not even read
    assert again.directory == shards.directory and again.train.tolist() == expected_train
    assert [p.name for p in shards.directory.parent.iterdir() if p.name.startswith(".")] == [
        ".lock"
    ]  # no temp dirs left


def test_changed_files_or_tokenizer_rebuild(tmp_path, tokenizer):
    count = Counter()
    first, _ = load_or_build_shards(tmp_path, {"files": [["a", 1, 2]]}, count, tokenizer)
    changed, built = load_or_build_shards(tmp_path, {"files": [["a", 1, 3]]}, count, tokenizer)  # new mtime
    assert built and changed.directory != first.directory
    other_tok = BPETokenizer.train(texts=TEXTS * 5, vocab_size=60)
    rebuilt, built = load_or_build_shards(tmp_path, {"files": [["a", 1, 2]]}, count, other_tok)
    assert built and rebuilt.directory not in (first.directory, changed.directory)
    assert count.calls == 3


def test_fingerprint_sees_edits(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    before = cache_key({"files": file_fingerprint([f])})
    f.write_text("one two")
    os.utime(f, ns=(1, 1))
    assert cache_key({"files": file_fingerprint([f])}) != before


def test_incomplete_shard_directory_is_not_used(tmp_path, tokenizer):
    shards, _ = load_or_build_shards(tmp_path, {"k": 1}, docs, tokenizer)
    with open(shards.directory / "train.bin", "ab") as f:  # a truncated/extended file
        f.write(b"\x00\x00")
    with pytest.raises(DamagedShards, match="train.bin has"):
        open_shards(shards.directory)
    (shards.directory / "meta.json").unlink()
    with pytest.raises(DamagedShards, match="meta.json is missing"):
        open_shards(shards.directory)


def test_unigram_statistics(tmp_path, tokenizer):
    shards, _ = load_or_build_shards(tmp_path, {"k": 2}, docs, tokenizer)
    train = np.asarray(shards.train, dtype=np.int64)
    p = np.bincount(train) / len(train)
    p = p[p > 0]
    assert math.isclose(shards.unigram_entropy, float(-(p * np.log(p)).sum()), rel_tol=1e-12)
    counts = np.bincount(train, minlength=tokenizer.vocab_size)
    q = (counts + 1) / (len(train) + tokenizer.vocab_size)
    expected = float(-np.log(q[np.asarray(shards.val, dtype=np.int64)]).mean())
    assert math.isclose(shards.val_unigram_cross_entropy, expected, rel_tol=1e-12)


class BigVocab:
    """A tokenizer with ids past 65,535 (a stand-in for a > 65,536-token vocabulary)."""

    vocab_size = 70_000

    def encode_batch(self, texts):
        return [[65_530 + len(word) for word in text.split()] for text in texts]

    def save(self, path):
        Path(path).write_text("big")


def test_uint32_shards_past_65536_tokens(tmp_path):
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32
    shards, _ = load_or_build_shards(tmp_path, {"k": 3}, docs, BigVocab())
    assert shards.train.dtype == np.uint32 and shards.meta["dtype"] == "uint32"
    assert shards.train.tolist() == [65_530 + len(w) for t in TEXTS[:3] for w in t.split()]
    assert max(shards.train) > 65_535  # would wrap in uint16
    assert open_shards(shards.directory).val.tolist() == [65_530 + len(w) for w in TEXTS[3].split()]
    with pytest.raises(ValueError, match="more than the 4294967296 ids"):
        token_dtype(2**32 + 1)


def test_long_units_are_encoded_in_pieces_with_the_same_tokens(tokenizer):
    text = read_documents(shakespeare_files()[:1])[0].text
    pieces = split_at_lines(text, 1000)
    assert len(pieces) > 50 and "".join(pieces) == text and all(p.endswith("\n") for p in pieces[:-1])
    assert [t for p in pieces for t in tokenizer.encode(p)] == tokenizer.encode(text)
    assert split_at_lines("a" * 30 + "\nb", 10) == ["a" * 30 + "\n", "b"]  # no newline within the size


class Interrupting:
    """Delegates to a tokenizer, raising KeyboardInterrupt at its `at`-th batch (a killed build)."""

    def __init__(self, tokenizer, at=None):
        self.tokenizer, self.at, self.calls = tokenizer, at, 0
        self.vocab_size, self.save = tokenizer.vocab_size, tokenizer.save

    def encode_batch(self, texts):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.tokenizer.encode_batch(texts)


def many_docs():
    lines = read_documents(shakespeare_files()[:1])[0].text.splitlines()
    return ListSource(
        [Document(str(i), "\n".join(lines[i * 40 : (i + 1) * 40])) for i in range(40)],
        [Document("v", "\n".join(lines[2000:2100]))],
    )


def digests(shards):
    return [hashlib.sha256((shards.directory / f"{s}.bin").read_bytes()).hexdigest() for s in ("train", "val")]


def test_an_interrupted_build_continues_where_it_stopped(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(shards_module, "BATCH_BYTES", 1000)
    monkeypatch.setattr(shards_module, "CHECKPOINT_BYTES", 3000)
    whole, _ = load_or_build_shards(tmp_path / "a", {"k": 4}, many_docs, Interrupting(tokenizer))
    killed = Interrupting(tokenizer, at=12)
    with pytest.raises(KeyboardInterrupt):
        load_or_build_shards(tmp_path / "b", {"k": 4}, many_docs, killed)
    partial = next((tmp_path / "b" / "shards").glob(".*.partial"))
    assert (partial / "progress.json").is_file()
    with pytest.raises(DamagedShards):
        open_shards(partial)
    said, again = [], Interrupting(tokenizer)
    resumed, built = load_or_build_shards(tmp_path / "b", {"k": 4}, many_docs, again, say=said.append)
    assert built and any("continuing the interrupted build" in m for m in said)
    total = Interrupting(tokenizer)
    load_or_build_shards(tmp_path / "c", {"k": 4}, many_docs, total)
    assert 0 < again.calls < total.calls - 8  # it did not start over
    assert digests(resumed) == digests(whole) and resumed.meta == whole.meta
    assert not partial.exists()


def test_leftovers_of_killed_builds_are_removed(tmp_path, tokenizer):
    """Issue 12, probe 8: `.KEY.*.tmp` shard directories of killed builds stayed forever."""
    root = tmp_path / "shards"
    legacy, other = root / ".0123abcd.x7_k2.tmp", root / ".feedbeef.partial"
    for d in (legacy, other):
        d.mkdir(parents=True)
        (d / "train.bin").write_bytes(b"\0" * 64)
    said = []
    shards, _ = load_or_build_shards(tmp_path, {"k": 5}, docs, tokenizer, say=said.append)
    assert not legacy.exists() and not other.exists()
    assert len([m for m in said if "left by a build that was killed" in m]) == 2
    assert sorted(p.name for p in root.iterdir()) == [".lock", shards.directory.name]


def test_one_build_at_a_time_per_cache(tmp_path, tokenizer):
    """A second process's build waits for the first (which may be building the same shards)."""
    import fcntl
    import threading

    (tmp_path / "shards").mkdir()
    said, result = [], {}
    with open(tmp_path / "shards" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # flock locks are per open file: this one blocks the thread's
        worker = threading.Thread(
            target=lambda: result.update(out=load_or_build_shards(tmp_path, {"k": 6}, docs, tokenizer, say=said.append))
        )
        worker.start()
        worker.join(timeout=2)
        assert worker.is_alive() and "out" not in result
        assert any("waiting for another process's token-shard build" in m for m in said)
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(timeout=60)
    assert result["out"][1] and result["out"][0].train.tolist() == [
        t for d in docs().train for t in tokenizer.encode(d.text)
    ]
