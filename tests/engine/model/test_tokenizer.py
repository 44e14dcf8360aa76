"""GPT-1's BPE: OpenAI's files as transformers reads them, training (reproducible across
processes), save/load, and bad vocabulary files."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.model.tokenizer import BPETokenizer
from helpers import GPT1_ENCODER as ENCODER  # noqa: E402
from helpers import GPT1_MERGES as MERGES
from helpers import needs_gpt1_files

TEXTS = [
    "Hello, World! It's a test.",
    "ROMEO: But, soft! what light through yonder window breaks?",
    "Naïve café — “quotes” and 123,456.78\nnew line\ttab",
    "unbalanced \" quote and 'apostrophes' don't won't",
    "日本語 ☃ x",
    "",
]


@needs_gpt1_files
def test_gpt1_files_match_transformers():
    transformers = pytest.importorskip("transformers")
    ours = BPETokenizer.from_gpt1_files(ENCODER, MERGES)
    vocab = json.loads(ENCODER.read_text())
    merges = [tuple(line.split()) for line in MERGES.read_text().split("\n")[1:] if line]
    if int(transformers.__version__.split(".")[0]) >= 5:  # v5 builds the fast tokenizer from vocab + merges
        hf = transformers.OpenAIGPTTokenizer(vocab=vocab, merges=merges)
    else:
        hf = transformers.OpenAIGPTTokenizerFast(vocab_file=str(ENCODER), merges_file=str(MERGES))
    assert hf.encode("hello world", add_special_tokens=False) != [0, 0], "transformers built an empty vocabulary"
    assert ours.vocab_size == 40478
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]


@needs_gpt1_files
def test_gpt1_files_round_trip_and_specials(tmp_path):
    tok = BPETokenizer.from_gpt1_files(ENCODER, MERGES)
    assert tok.decode(tok.encode("ROMEO: But, soft!")) == "romeo : but , soft !"
    sp = tok.add_special_tokens()
    assert (sp.start, sp.delimiter, sp.classify, sp.pad) == (40478, 40479, 40480, 40481)
    assert tok.add_special_tokens() == sp and tok.vocab_size == 40482  # idempotent
    tok.save(tmp_path / "tok.json")
    again = BPETokenizer.load(tmp_path / "tok.json")
    assert again.special_tokens() == sp and again.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_train_from_texts_and_files(tmp_path):
    corpus = ["the quick brown fox jumps over the lazy dog"] * 50 + ["to be or not to be, that is the question"] * 50
    tok = BPETokenizer.train(texts=corpus, vocab_size=120)
    assert 30 < tok.vocab_size <= 120 and tok.id_to_token(0) == "<unk>"  # capped: few merges reach min_frequency
    assert tok.decode(tok.encode("The lazy fox, be!")) == "the lazy fox , be <unk>"  # "!" never seen
    assert [tok.id_to_token(i) for i in tok.encode("lazy")] == ["lazy</w>"]  # a frequent word is one token
    (tmp_path / "a.txt").write_text("\n".join(corpus))
    from_files = BPETokenizer.train([tmp_path / "a.txt"], vocab_size=120)
    assert from_files.encode("the question") == tok.encode("the question")
    with pytest.raises(ValueError, match="special tokens"):
        tok.special_tokens()


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        BPETokenizer.from_gpt1_files(tmp_path / "enc.json", tmp_path / "vocab.bpe")
    (tmp_path / "enc.json").write_text("{broken")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="not a JSON"):
        BPETokenizer.from_gpt1_files(tmp_path / "enc.json", tmp_path / "vocab.bpe")
    (tmp_path / "enc.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="vocab.bpe:2"):
        BPETokenizer.from_gpt1_files(tmp_path / "enc.json", tmp_path / "vocab.bpe")
    with pytest.raises(FileNotFoundError):
        BPETokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="not a valid tokenizer"):
        BPETokenizer.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="exactly one"):
        BPETokenizer.train()
    with pytest.raises(FileNotFoundError):
        BPETokenizer.train([tmp_path / "missing.txt"])


TRAIN_IN_A_PROCESS = """
import hashlib, sys
from engine.data.corpus import read_documents, shakespeare_files
from engine.model.tokenizer import BPETokenizer
docs = read_documents(shakespeare_files()[:3])
tok = BPETokenizer.train(texts=lambda: (d.text for d in docs), vocab_size=int(sys.argv[1]))
tok.save(sys.argv[2])
"""


def test_training_gives_one_id_map_in_every_process(tmp_path):
    """Issue 12, probe 1: three processes training the same BPE on the same text got three id
    maps (the end-of-word forms' ids followed a per-process random hash order)."""
    root = Path(__file__).resolve().parents[3]  # the repository (this file is tests/engine/model/)
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    digests = set()
    for i in range(3):
        path = tmp_path / f"tok{i}.json"
        subprocess.run([sys.executable, "-c", TRAIN_IN_A_PROCESS, "500", str(path)], check=True, env=env, cwd=tmp_path)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    tok = BPETokenizer.load(tmp_path / "tok0.json")
    assert tok.vocab_size == 500 and tok.id_to_token(0) == "<unk>"
    assert tok.encode("e!") == [tok.token_to_id("e</w>"), tok.token_to_id("!</w>")]  # ordinary tokens, not special ones
    assert tok.encode("e</w>") != [tok.token_to_id("e</w>")]  # raw text "e</w>" is not matched as one token


def test_train_refuses_a_one_shot_iterator():
    with pytest.raises(ValueError, match="reads texts twice"):
        BPETokenizer.train(texts=iter(["to be or not to be"] * 5), vocab_size=40)


GOOD_ENCODER = {"<unk>": 0, "t": 1, "o": 2, "o</w>": 3, "t</w>": 4, "to</w>": 5}
MALFORMED_GPT1_FILES = {
    "merge of unknown tokens": (
        GOOD_ENCODER,
        "#version: 0.2\nt x</w>\n",
        "vocab.bpe:2: the merge .t x</w>. uses .x</w>., which is not in .*enc.json",
    ),
    "merge result not in the vocabulary": (
        {"<unk>": 0, "t": 1, "o</w>": 2},
        "#version: 0.2\nt o</w>\n",
        "uses .to</w>., which is not in",
    ),
    "two tokens, one id": (
        {**GOOD_ENCODER, "x": 5},
        "#version: 0.2\nt o</w>\n",
        "enc.json gives two tokens the same id",
    ),
    "negative id": ({**GOOD_ENCODER, "x": -1}, "#version: 0.2\nt o</w>\n", "enc.json holds an id outside"),
    "string ids": ({"t": "1"}, "#version: 0.2\n", "enc.json must map tokens to integer ids"),
    "not a map": ([1, 2], "#version: 0.2\n", "enc.json must map tokens to integer ids"),
    "merges not UTF-8": (GOOD_ENCODER, b"#version: 0.2\n\xff\xfe o\n", "vocab.bpe is not UTF-8"),
}


@pytest.mark.parametrize("name", list(MALFORMED_GPT1_FILES))
def test_malformed_gpt1_files_are_a_value_error_naming_the_file(tmp_path, name):
    """Issue 12, probe 6: these raised the tokenizers library's bare Exception."""
    encoder, merges, message = MALFORMED_GPT1_FILES[name]
    (tmp_path / "enc.json").write_text(json.dumps(encoder))
    (tmp_path / "vocab.bpe").write_bytes(merges if isinstance(merges, bytes) else merges.encode())
    with pytest.raises(ValueError, match=message):
        BPETokenizer.from_gpt1_files(tmp_path / "enc.json", tmp_path / "vocab.bpe")
    # The same directory with a well-formed pair loads: the error was about the content.
    (tmp_path / "enc.json").write_text(json.dumps(GOOD_ENCODER))
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nt o</w>\n")
    assert BPETokenizer.from_gpt1_files(tmp_path / "enc.json", tmp_path / "vocab.bpe").encode("to") == [5]
