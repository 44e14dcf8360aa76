"""GPT-1's BPE on Hugging Face `tokenizers`: train a new one, or load OpenAI's original files.

Two ways to cut text into words before the BPE (``mode``):

* ``"hf"`` (default): lower-cased, BERT-normalised text split by BERT's pre-tokenizer, as
  transformers' openai-gpt falls back to; all inside one `tokenizers` pipeline (fast, batched).
* ``"openai"``: OpenAI's TextEncoder — ftfy, text_standardize, spaCy's English tokenizer,
  lower-case (engine.openai_text); the words then go through the same BPE model. This gives
  OpenAI's own ids, the text GPT-1's weights were pretrained on (``from_gpt1_files`` only).

Both run BPE over characters with a ``</w>`` end-of-word suffix. Fine-tuning adds four special
tokens at the end of the vocabulary (``add_special_tokens``): start, delimiter, classify (the
paper's "extract") and pad.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

END_OF_WORD = "</w>"
UNK = "<unk>"
MODES = ("hf", "openai")
# An "openai" tokenizer is saved wrapped, {WRAPPER: {"mode": ...}, "tokenizer": ...}: plain
# `tokenizers` then refuses the file loudly instead of cutting words the other way.
WRAPPER = "gpt1_engine"


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the fine-tuning tokens (the paper's §3.3 input transformations)."""

    start: int
    delimiter: int
    classify: int
    pad: int


SPECIAL_TOKEN_TEXT = {"start": "<start>", "delimiter": "<delim>", "classify": "<classify>", "pad": "<pad>"}


def _gpt1_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.BPEDecoder(suffix=END_OF_WORD)
    return tokenizer


class BPETokenizer:
    """GPT-1 style BPE tokenizer. Build with ``train``, ``from_gpt1_files`` or ``load``."""

    def __init__(self, tokenizer: Tokenizer, mode: str = "hf") -> None:
        if mode not in MODES:
            raise ValueError(f"tokenizer mode must be one of {', '.join(MODES)}, got {mode!r}")
        self._tok = tokenizer
        self.mode = mode
        if mode == "openai":
            # The words come cut already (engine.openai_text); the model adds </w>.
            tokenizer.normalizer = None
            tokenizer.pre_tokenizer = None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        files: Iterable[str | Path] | None = None,
        *,
        texts: Iterable[str] | None = None,
        vocab_size: int = 8192,
        min_frequency: int = 2,
    ) -> "BPETokenizer":
        """Learns a BPE vocabulary of `vocab_size` tokens (incl. <unk>) from text `files` or
        from `texts`, an iterable of strings (exactly one of the two)."""
        if (files is None) == (texts is None):
            raise ValueError("BPETokenizer.train needs exactly one of files=[paths] or texts=iterable")
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        tok = _gpt1_pipeline(Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix=END_OF_WORD)))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[UNK],
            end_of_word_suffix=END_OF_WORD,
            show_progress=False,
        )
        if files is not None:
            paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(p) for p in files]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing or not paths:
                raise FileNotFoundError(f"tokenizer training files not found: {missing[:5] or '(none given)'}")
            tok.train([str(p) for p in paths], trainer)
        else:
            tok.train_from_iterator(iter(texts), trainer)
        if tok.get_vocab_size() <= 1:
            raise ValueError("tokenizer training data is empty: no tokens learned")
        return cls(tok)

    @classmethod
    def from_gpt1_files(cls, encoder_json: str | Path, vocab_bpe: str | Path, mode: str = "hf") -> "BPETokenizer":
        """GPT-1's original vocabulary: OpenAI's `encoder_bpe_40000.json` (token → id) and
        `vocab_40000.bpe` (merges, one "a b" pair per line after a version header).
        mode="openai" cuts words as OpenAI's TextEncoder did (module doc); "hf" as transformers."""
        if mode not in MODES:
            raise ValueError(f"tokenizer mode must be one of {', '.join(MODES)}, got {mode!r}")
        encoder_json, vocab_bpe = Path(encoder_json), Path(vocab_bpe)
        for p in (encoder_json, vocab_bpe):
            if not p.is_file():
                raise FileNotFoundError(f"GPT-1 vocabulary file not found: {p}")
        try:
            vocab = json.loads(encoder_json.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{encoder_json} is not a JSON token→id map: {e}") from None
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise ValueError(f"{encoder_json} must map tokens to integer ids")
        lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = []
        for n, line in enumerate(lines, start=2):
            if not line:
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{vocab_bpe}:{n}: expected a merge 'a b', got {line!r}")
            merges.append((pair[0], pair[1]))
        model = models.BPE(vocab=vocab, merges=merges, unk_token=UNK, end_of_word_suffix=END_OF_WORD, fuse_unk=False)
        return cls(_gpt1_pipeline(Tokenizer(model)), mode)

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        """Loads a tokenizer saved with `save` (one tokenizers JSON file)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            saved = json.loads(text)
            if isinstance(saved, dict) and WRAPPER in saved:
                return cls(Tokenizer.from_str(json.dumps(saved["tokenizer"])), saved[WRAPPER]["mode"])
            return cls(Tokenizer.from_str(text))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a valid tokenizer JSON file: {e}") from None
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path} is not a valid tokenizer JSON file: {e}") from None

    def save(self, path: str | Path) -> None:
        from .fileio import atomic_write_text

        text = self._tok.to_str()
        if self.mode != "hf":
            text = json.dumps({WRAPPER: {"mode": self.mode}, "tokenizer": json.loads(text)})
        atomic_write_text(path, text)

    # ---- use ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self.mode == "openai":
            return self.encode_batch([text])[0]
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.mode == "openai":
            from .openai_text import words

            cut = [words(t) for t in texts]
            return [e.ids if w else [] for w, e in zip(cut, self._tok.encode_batch([w or [""] for w in cut], is_pretokenized=True, add_special_tokens=False))]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Every id this tokenizer can produce, special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def add_special_tokens(self) -> SpecialTokens:
        """Appends start / delimiter / classify / pad to the vocabulary (once) and returns their ids."""
        missing = [t for t in SPECIAL_TOKEN_TEXT.values() if self._tok.token_to_id(t) is None]
        if missing:
            self._tok.add_special_tokens(missing)
        return self.special_tokens()

    def special_tokens(self) -> SpecialTokens:
        ids = {name: self._tok.token_to_id(text) for name, text in SPECIAL_TOKEN_TEXT.items()}
        if any(v is None for v in ids.values()):
            raise ValueError("this tokenizer has no fine-tuning special tokens; call add_special_tokens() first")
        return SpecialTokens(**ids)
