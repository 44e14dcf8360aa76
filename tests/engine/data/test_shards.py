"""Token shards: built once, reused while corpus and tokenizer are unchanged, rebuilt otherwise."""
import math
import os

import numpy as np
import pytest

from engine.data.corpus import Document
from engine.data.shards import (
    MAX_VOCAB,
    cache_key,
    check_vocab,
    file_fingerprint,
    load_or_build_shards,
    open_shards,
)
from engine.tokenizer import BPETokenizer

TEXTS = ["the cat sat on the mat", "a dog ate the cat's dinner", "to be or not to be", "the end of the story"]


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train(texts=TEXTS * 5, vocab_size=80)


def docs():
    return [Document(f"d{i}", t) for i, t in enumerate(TEXTS[:3])], [Document("v", TEXTS[3])]


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
    expected_train = [t for d in docs()[0] for t in tokenizer.encode(d.text)]
    assert shards.train.dtype == np.uint16 and isinstance(shards.train, np.memmap)
    assert shards.train.tolist() == expected_train
    assert shards.val.tolist() == tokenizer.encode(TEXTS[3])
    again, built = load_or_build_shards(tmp_path, {"files": [["a", 1, 2]]}, count, tokenizer)
    assert not built and count.calls == 1  # the documents were not even read
    assert again.directory == shards.directory and again.train.tolist() == expected_train
    assert not [p for p in shards.directory.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


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
    assert open_shards(shards.directory) is None
    (shards.directory / "meta.json").unlink()
    assert open_shards(shards.directory) is None


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


def test_vocab_too_large_for_uint16():
    check_vocab(MAX_VOCAB)  # ids 0..65535 fit
    with pytest.raises(ValueError, match="65537 tokens, more than the 65536 ids"):
        check_vocab(MAX_VOCAB + 1)
