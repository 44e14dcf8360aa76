"""Pretraining data, prepared: the corpus a run names, its tokenizer (trained or loaded) and its
token shards, all cached (``python -m engine.pretrain --prepare-only`` stops here).

Nothing holds the corpus in memory: the BPE trains from a stream of the training split and
the shards are built from one (engine.data.shards). The split is decided unit by unit as the
text streams past (engine.data.corpus.HashSplit); the embedded corpus holds out whole works.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.cli import UserError
from engine.data import corpus
from engine.data.shards import cache_key, file_fingerprint, load_or_build_shards
from engine.model.tokenizer import BPETokenizer, load_tokenizer

# Bumped when trained tokenizers change for the same inputs: 2 = reproducible across processes.
BPE_TRAINING_VERSION = 2


@dataclass
class CorpusSource:
    """The units of a corpus for a shard build (engine.data.shards.UnitSource): every
    document of `train_files` split by `split`, or, when `split` is None, `train_files`
    for training and `val_files` for validation."""

    train_files: list[Path]
    val_files: list[Path]
    text_field: str
    split: corpus.HashSplit | None
    _tally: corpus.SplitTally | None = field(default=None, repr=False, compare=False)  # of the last units() pass

    @property
    def plan(self) -> str:
        return self.split.plan if self.split is not None else "files"

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.train_files + self.val_files)

    def units(self) -> Iterator[tuple[bool, str]]:
        if self.split is None:
            yield from ((False, d.text) for d in corpus.iter_documents(self.train_files, self.text_field))
            yield from ((True, d.text) for d in corpus.iter_documents(self.val_files, self.text_field))
            return
        self._tally = corpus.SplitTally()
        for is_val, unit in self.split.assign(corpus.iter_documents(self.train_files, self.text_field), self._tally):
            yield is_val, unit.text

    def finish(self) -> "CorpusSource | None":
        if self.split is None or self._tally is None:
            return None
        fixed = self._tally.settle(self.split)
        return None if fixed is None else dataclasses.replace(self, split=fixed, _tally=None)


class Corpus:
    """Where a run's text comes from (the embedded corpus or --data), read lazily and as a
    stream: a warm cache never opens the files. `pcfg` is engine.pretrain.PretrainConfig."""

    def __init__(self, pcfg: Any) -> None:
        self.pcfg = pcfg
        self._source: CorpusSource | None = None
        if pcfg.data is None:
            if pcfg.val_data is not None:
                raise UserError("--val-data needs --data (the embedded corpus has its own held-out works)")
            self.train_files, self.val_files = corpus.shakespeare_split()
            self.name = "shakespeare"
            self.split: dict[str, Any] = {"held_out_works": list(corpus.SHAKESPEARE_VALIDATION)}
        else:
            self.train_files = corpus.resolve_files(pcfg.data)
            self.val_files = corpus.resolve_files(pcfg.val_data) if pcfg.val_data else []
            both = {p.resolve() for p in self.train_files} & {p.resolve() for p in self.val_files}
            if both:
                raise UserError(f"{sorted(both)[0]} is in both --data and --val-data")
            self.name = ", ".join(pcfg.data)
            self.split = {"val_files": True} if pcfg.val_data else {"val_fraction": pcfg.val_fraction}
        self.split["text_field"] = pcfg.text_field

    def source(self) -> CorpusSource:
        """The units to tokenise (the files are first opened here, to count documents)."""
        if self._source is None:
            field = self.pcfg.text_field
            if self.val_files:
                corpus.count_documents(self.train_files, field, limit=1)  # an empty side is an error now, not later
                corpus.count_documents(self.val_files, field, limit=1)
                self._source = CorpusSource(self.train_files, self.val_files, field, None)
            else:
                n = corpus.count_documents(self.train_files, field, limit=corpus.MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT)
                split = corpus.HashSplit.for_documents(self.pcfg.val_fraction, n)
                self._source = CorpusSource(self.train_files, [], field, split)
        return self._source

    def train_texts(self) -> Iterator[str]:
        """The training split's units, streamed (a fresh pass on each call). A pass that
        finds the split needs a fix-up adopts it, so the next pass reads the final split."""
        source = self.source()
        yield from (text for is_val, text in source.units() if not is_val)
        fixed = source.finish()
        if fixed is not None:
            self._source = fixed

    def documents(self) -> tuple[list[corpus.Document], list[corpus.Document]]:
        """(train, validation) units as lists: for small corpora and tests."""
        source = self.source()
        while True:
            train_docs: list[corpus.Document] = []
            val_docs: list[corpus.Document] = []
            for is_val, text in source.units():
                (val_docs if is_val else train_docs).append(corpus.Document("", text))
            fixed = source.finish()
            if fixed is None:
                return train_docs, val_docs
            self._source = source = fixed

    def key(self) -> dict[str, Any]:
        return {
            "train_files": file_fingerprint(self.train_files),
            "val_files": file_fingerprint(self.val_files),
            "split": self.split,
        }

    def tokenizer_path(self, cache: Path) -> Path:
        """Where the BPE trained on this corpus (with the run's --vocab-size) is cached."""
        key = cache_key(
            {**self.key(), "vocab_size": self.pcfg.vocab_size, "kind": "bpe", "bpe_training": BPE_TRAINING_VERSION}
        )
        return cache / "tokenizers" / f"{key}.json"

    def tokenizer(self, cache: Path, say: Callable[..., None]) -> tuple[Any, str]:
        """(tokenizer, a note on where it came from): --tokenizer, else the cached BPE, else
        a BPE trained now on the training split and cached (also in place of a cached one
        that no longer loads: BPE training is reproducible)."""
        spec = self.pcfg.tokenizer
        if spec is not None:
            return load_tokenizer(spec, self.pcfg.tokenizer_mode, "--tokenizer"), f"loaded from {' + '.join(spec)}"
        path = self.tokenizer_path(cache)
        if path.is_file():
            try:
                return BPETokenizer.load(path), f"BPE trained on the training split (cached: {path})"
            except ValueError:  # replaced below, atomically
                say(f"cached tokenizer {path} is incomplete or damaged: retraining")
        say(f"training a {self.pcfg.vocab_size}-token BPE tokenizer on the training split ...")
        tok = BPETokenizer.train(texts=self.train_texts, vocab_size=self.pcfg.vocab_size)
        tok.save(path)
        return tok, f"BPE trained on the training split (saved: {path})"

    def shards(self, cache: Path, tokenizer: Any, say: Callable[..., None], progress: bool = True) -> tuple[Any, bool]:
        """(token shards, whether they were built now): cached, else built from the stream."""

        def source() -> CorpusSource:
            say("tokenising the corpus into token shards (once; cached) ...")
            return self.source()

        return load_or_build_shards(cache, self.key(), source, tokenizer, progress=progress, say=say)


def prepare(pcfg: Any, cache: Path, say: Callable[..., None] = print, tokenizer: tuple[Any, str] | None = None) -> int:
    """--prepare-only: the tokenizer and token shards, built (or found) in the cache, and
    where they are. A run with the same data, tokenizer flags and cache reuses them.
    `tokenizer` = (tokenizer, where it came from) when the run's is not the corpus's (--init)."""
    data = Corpus(pcfg)
    tokenizer, note = tokenizer if tokenizer is not None else data.tokenizer(cache, say)
    shards, built = data.shards(cache, tokenizer, say)
    meta = shards.meta
    say(f"tokenizer  {note}")
    say(
        f"shards     {shards.directory}/ ({'built now' if built else 'cached'}): train {meta['train_tokens']:,} tokens "
        f"({meta['train_documents']:,} units), validation {meta['val_tokens']:,} tokens "
        f"({meta['val_documents']:,} units), "
        f"{meta['dtype']}"
    )
    return 0
