"""mode="openai" against an emulation of OpenAI's TextEncoder (finetune-transformer-lm's
text_utils.py, transcribed here as the spec): ftfy, text_standardize, spaCy, lower, its own BPE
loop, unknown pieces → id 0."""

import json
from pathlib import Path

import pytest

pytest.importorskip("ftfy", reason="the [openai] extra is not installed")
pytest.importorskip("spacy", reason="the [openai] extra is not installed")

from engine.model.openai_text import text_standardize  # noqa: E402
from engine.model.tokenizer import BPETokenizer  # noqa: E402
from helpers import GPT1_ENCODER as ENCODER  # noqa: E402
from helpers import GPT1_MERGES as MERGES
from helpers import needs_gpt1_files

TEXTS = [
    "I don't know — she said “no”… and left.",
    "Naïve café costs 3,50€; isn't it?\n\nNew paragraph\twith a tab.",
    "ROMEO: But, soft! what light through yonder window breaks?!!",
    'He said "hello" -- and (then) [left] {quickly} / slowly * twice | ~~ __',
    "mojibake: cafÃ© and a ´tick´",
    "",
]


class OpenAITextEncoder:
    """text_utils.TextEncoder, with spacy.blank('en') for spacy.load('en')."""

    def __init__(self, encoder_path: Path, bpe_path: Path) -> None:
        import spacy

        self.nlp = spacy.blank("en")
        self.encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
        merges = bpe_path.read_text(encoding="utf-8").split("\n")[1:-1]
        self.bpe_ranks = {tuple(m.split()): i for i, m in enumerate(merges)}

    def bpe(self, token: str) -> str:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = {(a, b) for a, b in zip(word, word[1:])}
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
            if len(word) == 1:
                break
            pairs = {(a, b) for a, b in zip(word, word[1:])}
        out = " ".join(word)
        return "\n</w>" if out == "\n  </w>" else out

    def encode(self, text: str) -> list[int]:
        import ftfy

        ids = []
        for token in self.nlp(text_standardize(ftfy.fix_text(text))):
            ids.extend(self.encoder.get(t, 0) for t in self.bpe(token.text.lower()).split(" "))
        return ids


def _tiny_vocab(tmp_path: Path) -> tuple[Path, Path]:
    """A small GPT-1-format vocabulary: characters, a few merges, <unk> at 0, '\\n</w>'."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz.,;:!?'\"-()[]{}/*|~_0123456789€ïé"))
    vocab = ["<unk>"] + chars + [c + "</w>" for c in chars]
    merges = [("d", "o"), ("n", "'"), ("n'", "t</w>"), ("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    vocab += ["".join(m) for m in merges] + ["\n</w>"]
    enc, bpe = tmp_path / "encoder.json", tmp_path / "vocab.bpe"
    enc.write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    bpe.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return enc, bpe


def test_text_standardize_matches_openai():
    assert text_standardize("a—b–c―d…e´f") == "a - b - c - d...e'f"
    assert text_standardize('x!!y "z"  \n\n  w') == 'x !! y " z " \n w'


def test_tiny_vocabulary_matches_emulation(tmp_path):
    enc, bpe = _tiny_vocab(tmp_path)
    ours, spec = BPETokenizer.from_gpt1_files(enc, bpe, mode="openai"), OpenAITextEncoder(enc, bpe)
    texts = TEXTS + ["and the don't\nthe end", "Ünknown ☃ chars"]
    assert [ours.encode(t) for t in texts] == [spec.encode(t) for t in texts]
    assert ours.encode_batch(texts) == [spec.encode(t) for t in texts]


@needs_gpt1_files
def test_gpt1_files_match_openais_text_encoder():
    ours, spec = BPETokenizer.from_gpt1_files(ENCODER, MERGES, mode="openai"), OpenAITextEncoder(ENCODER, MERGES)
    for text in TEXTS:
        assert ours.encode(text) == spec.encode(text), text
    tokens = [ours.id_to_token(i) for i in ours.encode("I don't know.\nCafé…")]
    assert tokens == ["i</w>", "do</w>", "n't</w>", "know</w>", ".</w>", "\n</w>", "café</w>", "...</w>"]
    hf = BPETokenizer.from_gpt1_files(ENCODER, MERGES)  # the default cuts words as transformers does
    assert hf.encode("don't") != ours.encode("don't")


def test_openai_mode_survives_save_and_load(tmp_path):
    enc, bpe = _tiny_vocab(tmp_path)
    tok = BPETokenizer.from_gpt1_files(enc, bpe, mode="openai")
    tok.add_special_tokens()
    tok.save(tmp_path / "tokenizer.json")
    back = BPETokenizer.load(tmp_path / "tokenizer.json")
    assert back.mode == "openai" and back.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    assert back.special_tokens() == tok.special_tokens()


def test_unknown_mode_is_refused(tmp_path):
    enc, bpe = _tiny_vocab(tmp_path)
    with pytest.raises(ValueError, match="mode"):
        BPETokenizer.from_gpt1_files(enc, bpe, mode="spacy")


def test_run_directories_holding_gpt1_files_load_in_either_mode(tmp_path):
    """--tokenizer-mode for --init directories with OpenAI's files (both CLIs go through this loader)."""
    from engine.model.tokenizer import load_tokenizer

    enc, bpe = _tiny_vocab(tmp_path)
    enc.rename(tmp_path / "encoder_bpe_40000.json")
    bpe.rename(tmp_path / "vocab_40000.bpe")
    text = "I don't know.\nThe end"
    spec = OpenAITextEncoder(tmp_path / "encoder_bpe_40000.json", tmp_path / "vocab_40000.bpe")
    assert load_tokenizer(tmp_path, mode="openai").encode(text) == spec.encode(text)
    assert load_tokenizer([str(tmp_path)], "openai").encode(text) == spec.encode(text)
    assert load_tokenizer(tmp_path).mode == "hf" and load_tokenizer(tmp_path).encode(text) != spec.encode(text)
