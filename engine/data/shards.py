"""Token shards: a corpus tokenised once into uint16 arrays on disk, memory-mapped, cached.

    <cache>/shards/<key>/train.bin, val.bin   token ids, uint16, documents back to back
    <cache>/shards/<key>/meta.json            counts, vocabulary size, unigram statistics

The key hashes everything the tokens depend on: each corpus file's path, size and mtime,
the split, the JSONL text field and the tokenizer itself. A shard directory is built under
a temporary name and renamed into place when complete, so a crashed build is never used;
a changed file or tokenizer gives a new key, hence a rebuild.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..fileio import _fsync_dir, atomic_write_text

SHARD_VERSION = 1
TOKEN_DTYPE = np.uint16
MAX_VOCAB = int(np.iinfo(TOKEN_DTYPE).max) + 1  # ids 0..65535
ENCODE_CHUNK = 256  # documents per tokenizer call


def default_cache_dir() -> Path:
    """$GPT1_CACHE_DIR, else ~/.cache/gpt1-engine."""
    env = os.environ.get("GPT1_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "gpt1-engine"


def file_fingerprint(files: list[Path]) -> list[list[Any]]:
    """[(absolute path, size, mtime_ns)] of each file: what the cache key watches."""
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"version": SHARD_VERSION, **parts}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def check_vocab(vocab_size: int) -> None:
    if vocab_size > MAX_VOCAB:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens, more than the {MAX_VOCAB} ids uint16 token shards can hold"
        )


@dataclass
class TokenShards:
    """Memory-mapped train and validation token arrays (uint16) and their metadata."""

    directory: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]

    @property
    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the training tokens' unigram distribution: the loss of
        the best model that ignores context, on the training text."""
        return self.meta["unigram_entropy"]

    @property
    def val_unigram_cross_entropy(self) -> float:
        """Cross-entropy (nats/token) of the validation tokens under the training unigram
        distribution (add-one smoothed): the context-free baseline for the validation loss."""
        return self.meta["val_unigram_cross_entropy"]


def open_shards(directory: Path) -> TokenShards | None:
    """The shards in `directory`, or None when it is not a complete shard directory."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    arrays = []
    for split in ("train", "val"):
        path = directory / f"{split}.bin"
        n = meta.get(f"{split}_tokens")
        if not path.is_file() or not isinstance(n, int) or path.stat().st_size != n * np.dtype(TOKEN_DTYPE).itemsize:
            return None
        arrays.append(np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(n,)) if n else np.zeros(0, TOKEN_DTYPE))
    return TokenShards(directory, arrays[0], arrays[1], meta)


def load_or_build_shards(
    cache_dir: Path,
    key_parts: dict[str, Any],
    documents: Callable[[], tuple[list[Any], list[Any]]],
    tokenizer: Any,
) -> tuple[TokenShards, bool]:
    """The cached shards for `key_parts` (+ the tokenizer), built from `documents()` →
    (train docs, val docs) on a miss. Returns (shards, whether they were built now)."""
    check_vocab(tokenizer.vocab_size)
    key = cache_key({**key_parts, "tokenizer": tokenizer_digest(tokenizer)})
    directory = cache_dir / "shards" / key
    shards = open_shards(directory)
    if shards is not None:
        return shards, False
    train_docs, val_docs = documents()
    return build_shards(directory, train_docs, val_docs, tokenizer, key_parts), True


def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of the tokenizer's saved JSON (vocabulary, merges, normaliser ...)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokenizer.json"
        tokenizer.save(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()


def build_shards(directory: Path, train_docs: list[Any], val_docs: list[Any], tokenizer: Any, source: dict[str, Any]) -> TokenShards:
    """Tokenises the documents (objects with .text) into `directory` atomically."""
    check_vocab(tokenizer.vocab_size)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
        n_train = _write_tokens(tmp / "train.bin", train_docs, tokenizer, counts)
        n_val = _write_tokens(tmp / "val.bin", val_docs, tokenizer, None)
        if n_train == 0:
            raise ValueError("the training split holds no tokens after tokenisation")
        p = counts[counts > 0] / n_train
        val = np.memmap(tmp / "val.bin", dtype=TOKEN_DTYPE, mode="r", shape=(n_val,)) if n_val else np.zeros(0, TOKEN_DTYPE)
        q = (counts + 1) / (n_train + tokenizer.vocab_size)
        val_xent = float(-np.log(q[val]).mean()) if n_val else math.nan
        del val
        meta = {
            "version": SHARD_VERSION,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "train_documents": len(train_docs),
            "val_documents": len(val_docs),
            "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(TOKEN_DTYPE).name,
            "unigram_entropy": float(-(p * np.log(p)).sum()),
            "val_unigram_cross_entropy": val_xent,
            "source": source,
        }
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1) + "\n")
        _fsync_dir(tmp)
        try:
            os.replace(tmp, directory)
        except OSError:  # another process finished the same shards first: use theirs
            if open_shards(directory) is None:
                raise
        _fsync_dir(directory.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shards = open_shards(directory)
    assert shards is not None, f"shards at {directory} unreadable right after writing"
    return shards


def _write_tokens(path: Path, docs: list[Any], tokenizer: Any, counts: np.ndarray | None) -> int:
    n = 0
    with open(path, "wb") as f:
        for i in range(0, len(docs), ENCODE_CHUNK):
            encoded = tokenizer.encode_batch([d.text for d in docs[i : i + ENCODE_CHUNK]])
            arr = np.fromiter((t for ids in encoded for t in ids), dtype=np.int64)
            if counts is not None:
                counts += np.bincount(arr, minlength=len(counts))
            f.write(arr.astype(TOKEN_DTYPE).tobytes())
            n += len(arr)
        f.flush()
        os.fsync(f.fileno())
    return n
