"""GPT-1's BPE on Hugging Face `tokenizers`: train a new one, or load OpenAI's original files.

Two ways to cut text into words before the BPE (``mode``):

* ``"hf"`` (default): lower-cased, BERT-normalised text split by BERT's pre-tokenizer, as
  transformers' openai-gpt falls back to; all inside one `tokenizers` pipeline (fast, batched).
* ``"openai"``: OpenAI's TextEncoder — ftfy, text_standardize, spaCy's English tokenizer,
  lower-case (engine.model.openai_text); the words then go through the same BPE model. This gives
  OpenAI's own ids, the text GPT-1's weights were pretrained on (``from_gpt1_files`` only).

Both run BPE over characters with a ``</w>`` end-of-word suffix. Fine-tuning adds four special
tokens at the end of the vocabulary (``add_special_tokens``): start, delimiter, classify (the
paper's "extract") and pad.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

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


def _file_lines(paths: list[Path]) -> Iterator[str]:
    for p in paths:
        with open(p, encoding="utf-8") as f:
            yield from f


def _train_deterministic(texts: Callable[[], Iterable[str]], vocab_size: int, min_frequency: int) -> Tokenizer:
    """BPE training whose id map does not depend on the process.

    Why tokenizers' BpeTrainer alone is not reproducible: it gives the initial characters
    sorted ids, but the end-of-word forms ("e</w>") get theirs in the order it meets them
    while iterating its word counts, a hash map seeded at random in each process (threads
    play no part: RAYON_NUM_THREADS=1 still differs). Those ids then break ties between
    equally frequent merges, so the merges differ too. Declaring every "c</w>" of the
    corpus's (normalised) alphabet up front, in sorted order, leaves nothing to that
    iteration order; the tokenizer is then rebuilt from the learned vocabulary and merges so
    those forms are ordinary tokens, not special ones matched in raw text."""
    pipeline = _gpt1_pipeline(Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix=END_OF_WORD)))
    alphabet: set[str] = set()
    for text in texts():
        alphabet.update(pipeline.normalizer.normalize_str(text))
    alphabet.discard(" ")  # the normaliser turns all whitespace into spaces; words never hold one
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[UNK] + [c + END_OF_WORD for c in sorted(alphabet)],
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    pipeline.train_from_iterator(iter(texts()), trainer)
    learned = json.loads(pipeline.to_str())["model"]
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]
    ]  # "a b" before tokenizers 0.20
    tok = _gpt1_pipeline(
        Tokenizer(models.BPE(vocab=learned["vocab"], merges=merges, unk_token=UNK, end_of_word_suffix=END_OF_WORD))
    )
    tok.add_special_tokens([UNK])
    return tok


class BPETokenizer:
    """GPT-1 style BPE tokenizer. Build with ``train``, ``from_gpt1_files`` or ``load``."""

    def __init__(self, tokenizer: Tokenizer, mode: str = "hf") -> None:
        if mode not in MODES:
            raise ValueError(f"tokenizer mode must be one of {', '.join(MODES)}, got {mode!r}")
        self._tok = tokenizer
        self.mode = mode
        if mode == "openai":
            # The words come cut already (engine.model.openai_text); the model adds </w>.
            tokenizer.normalizer = None
            tokenizer.pre_tokenizer = None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        files: Iterable[str | Path] | None = None,
        *,
        texts: Iterable[str] | Callable[[], Iterable[str]] | None = None,
        vocab_size: int = 8192,
        min_frequency: int = 2,
    ) -> "BPETokenizer":
        """Learns a BPE vocabulary of `vocab_size` tokens (incl. <unk>) from text `files` or
        from `texts` (exactly one of the two). The texts are read twice, streamed: pass a
        re-iterable collection or a function returning a fresh iterable.

        The result is a function of the texts and their order alone, the same in every
        process: see ``_train_deterministic``."""
        if (files is None) == (texts is None):
            raise ValueError("BPETokenizer.train needs exactly one of files=[paths] or texts=iterable")
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        if files is not None:
            paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(p) for p in files]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing or not paths:
                raise FileNotFoundError(f"tokenizer training files not found: {missing[:5] or '(none given)'}")

            def source() -> Iterable[str]:
                return _file_lines(paths)
        elif callable(texts):
            source = texts
        elif iter(texts) is texts:  # type: ignore[arg-type]
            raise ValueError(
                "BPETokenizer.train reads texts twice: pass a list or a function returning a fresh iterable, "
                "not an iterator"
            )
        else:

            def source() -> Iterable[str]:
                return texts  # type: ignore[return-value]

        tok = _train_deterministic(source, vocab_size, min_frequency)
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
        if not isinstance(vocab, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()
        ):
            raise ValueError(f"{encoder_json} must map tokens to integer ids")
        if not all(0 <= v < 2**32 for v in vocab.values()):
            raise ValueError(f"{encoder_json} holds an id outside [0, 2^32)")
        if len(set(vocab.values())) != len(vocab):
            raise ValueError(f"{encoder_json} gives two tokens the same id; expected one id per token")
        try:
            lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{vocab_bpe} is not UTF-8 text (byte offset {e.start}); expected GPT-1's merges file"
            ) from None
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = []
        for n, line in enumerate(lines, start=2):
            if not line:
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{vocab_bpe}:{n}: expected a merge 'a b', got {line!r}")
            # Checked here: tokenizers panics on some of these (a merge whose result is unknown).
            unknown = [t for t in (pair[0], pair[1], pair[0] + pair[1]) if t not in vocab]
            if unknown:
                raise ValueError(
                    f"{vocab_bpe}:{n}: the merge {line!r} uses {unknown[0]!r}, which is not in {encoder_json}"
                )
            merges.append((pair[0], pair[1]))
        try:
            model = models.BPE(
                vocab=vocab, merges=merges, unk_token=UNK, end_of_word_suffix=END_OF_WORD, fuse_unk=False
            )
        except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
            raise ValueError(f"{vocab_bpe} does not fit {encoder_json}: {e}") from None
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
        from engine.fileio import atomic_write_text

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
        """Each text's ids, encoded in parallel; without the character offsets (which nothing
        here reads) where the library can skip them (encode_batch_fast, tokenizers >= 0.20)."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        if self.mode == "openai":
            from engine.model.openai_text import words

            cut = [words(t) for t in texts]
            return [
                e.ids if w else []
                for w, e in zip(cut, encode([w or [""] for w in cut], is_pretokenized=True, add_special_tokens=False))
            ]
        return [e.ids for e in encode(texts, add_special_tokens=False)]

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


def load_tokenizer(
    source: str | Path | Sequence[str | Path], mode: str = "hf", what: str = "tokenizer"
) -> BPETokenizer:
    """The one way a tokenizer is read from disk. `source`: a tokenizer.json; a directory holding
    tokenizer.json (this engine), vocab.json + merges.txt (Hugging Face openai-gpt) or
    encoder_bpe_*.json + vocab_*.bpe (OpenAI's release); or OpenAI's two files as two paths.
    `mode`: how GPT-1's vocabulary files cut words (module doc); `what` names the source in errors."""
    paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{what} path not found: {p}")
    if len(paths) == 2:
        encoder, merges = sorted(paths, key=lambda p: p.suffix != ".json")
        return BPETokenizer.from_gpt1_files(encoder, merges, mode=mode)
    (p,) = paths
    if p.is_file():
        return BPETokenizer.load(p)
    if (p / "tokenizer.json").is_file():
        return BPETokenizer.load(p / "tokenizer.json")
    for encoder, merges in (("vocab.json", "merges.txt"), ("encoder_bpe_*.json", "vocab_*.bpe")):
        found = sorted(p.glob(encoder)), sorted(p.glob(merges))
        if all(found):
            return BPETokenizer.from_gpt1_files(found[0][0], found[1][0], mode=mode)
    raise FileNotFoundError(
        f"{what} {p}: no tokenizer.json or encoder_bpe_*.json + vocab_*.bpe (nor vocab.json + merges.txt) in it"
    )
