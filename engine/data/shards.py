"""Token shards: a corpus tokenised once, in a stream, into arrays on disk, memory-mapped, cached.

    <cache>/shards/<key>/train.bin, val.bin   token ids (uint16, or uint32 past 65,536 tokens),
                                              units back to back in corpus order
    <cache>/shards/<key>/meta.json            counts, vocabulary size, dtype, unigram statistics,
                                              each file's digests and largest token id

The key hashes everything the tokens depend on: each corpus file's path, size and mtime,
the split, the JSONL text field and the tokenizer itself; a changed file or tokenizer gives
a new key, hence a rebuild.

The build streams: units of text are tokenised in batches (the tokenizers library's batch
encoding, which runs on every core) and appended to the two files, so memory holds one batch,
not the corpus. It happens in ``.<key>.partial/`` and records its progress there every
CHECKPOINT_BYTES of text: a build that is killed continues from its last record at the next
call. The finished directory is renamed into place, so a half-built one is never used. One
build at a time per cache (a lock file), which also makes it safe to remove what killed builds
of other keys left behind.

Opening an entry checks it whole (engine.data.integrity: sizes, then every byte against the
digests recorded at build time). One that is incomplete or changed is never used: under the
lock it is named in one line and rebuilt in its place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np

from engine.data.integrity import DIGEST_BYTES, DamagedShards, FileRecord, check_file
from engine.fileio import atomic_write_text, fsync_dir, naming

SHARD_VERSION = 1  # unchanged by streaming: the same inputs give the same bytes as before
MAX_VOCAB = 2**32  # uint32 ids
# Text per tokenizer call. Its encodings are what a build's memory holds: ~90 bytes per
# character of text (measured with tokenizers 0.23, an 8192-token BPE), ~180 MB at 2 MB.
BATCH_BYTES = 2 << 20
BATCH_UNITS = 1024
# Longer units are encoded in pieces cut at line ends (the same tokens): every batch then
# has pieces for every core of the tokenizer's thread pool, even a batch of one document.
PIECE_CHARS = 1 << 16
CHECKPOINT_BYTES = 64 << 20  # text between two progress records of a build
STATS_CHUNK = 1 << 20  # tokens per step of the unigram statistics (8 MB as int64)


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


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocabularies up to 65,536), else uint32."""
    check_vocab(vocab_size)
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def check_vocab(vocab_size: int) -> None:
    if vocab_size > MAX_VOCAB:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens, more than the {MAX_VOCAB} ids uint32 token shards can hold"
        )


class UnitSource(Protocol):
    """What a build reads: the corpus's units, each with its side of the split."""

    plan: str  # names the split decision; progress recorded under another plan is discarded
    total_bytes: int  # about how much text units() yields (for the progress bar)

    def units(self) -> Iterable[tuple[bool, str]]:
        """(is validation, text) for each unit, in the same order on every call."""

    def finish(self) -> "UnitSource | None":
        """Called once units() is exhausted: None when the split stands, else the source to
        build from instead (a fix-up of the split); raises ValueError for an unusable corpus."""


@dataclass
class ListSource:
    """Units from two lists of objects with .text: training first, then validation."""

    train: list[Any]
    val: list[Any]
    plan: str = "lists"

    @property
    def total_bytes(self) -> int:
        return sum(len(d.text) for d in self.train + self.val)

    def units(self) -> Iterator[tuple[bool, str]]:
        yield from ((False, d.text) for d in self.train)
        yield from ((True, d.text) for d in self.val)

    def finish(self) -> None:
        return None


@dataclass
class TokenShards:
    """Memory-mapped train and validation token arrays and their metadata."""

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
    """The shards in `directory`, their bytes checked against what the build recorded
    (engine.data.integrity); None when there is no such directory; DamagedShards saying what
    is wrong when it is incomplete or its content changed."""
    if not os.path.lexists(directory):
        return None
    meta = _read_meta(directory)
    record = meta.get("integrity")
    if not isinstance(record, dict) or not isinstance(record.get("block_bytes"), int) or record["block_bytes"] < 1:
        raise DamagedShards("meta.json records no digests (it was written before they existed)")
    for split in ("train", "val"):
        path = directory / f"{split}.bin"
        n = meta[f"{split}_tokens"] * np.dtype(meta["dtype"]).itemsize
        if not path.is_file():
            raise DamagedShards(f"{path.name} is missing")
        if path.stat().st_size != n:
            raise DamagedShards(f"{path.name} has {path.stat().st_size:,} bytes, meta.json records {n:,}")
        entry = record.get(path.name)
        if not isinstance(entry, dict):
            raise DamagedShards(f"meta.json records no digests of {path.name}")
        check_file(path, entry, record["block_bytes"], meta["vocab_size"])
    return _mapped(directory, meta)


def _read_meta(directory: Path) -> dict[str, Any]:
    """meta.json with the fields opening needs, well typed; DamagedShards otherwise."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise DamagedShards("meta.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DamagedShards("meta.json is not valid JSON") from None
    ints = ("train_tokens", "val_tokens", "vocab_size")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) and meta[k] >= 0 for k in ints):
        raise DamagedShards(f"meta.json lacks one of {', '.join(ints)}")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise DamagedShards(f"meta.json's dtype {meta.get('dtype')!r} is not uint16 or uint32")
    return meta


def _mapped(directory: Path, meta: dict[str, Any]) -> TokenShards:
    dtype = np.dtype(meta["dtype"])
    arrays = []
    for split in ("train", "val"):
        n = meta[f"{split}_tokens"]
        path = directory / f"{split}.bin"
        arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype))
    return TokenShards(directory, arrays[0], arrays[1], meta)


def load_or_build_shards(
    cache_dir: Path,
    key_parts: dict[str, Any],
    source: Callable[[], UnitSource],
    tokenizer: Any,
    *,
    progress: bool = False,
    say: Callable[[str], None] = lambda message: None,
) -> tuple[TokenShards, bool]:
    """The cached shards for `key_parts` (+ the tokenizer), built from `source()` on a miss
    (continuing an interrupted build of the same key). Returns (shards, whether built now).
    `progress` shows a progress bar (MB/s, tokens/s) when stderr is a terminal; `say` hears
    what was cleaned up or resumed."""
    token_dtype(tokenizer.vocab_size)
    key = cache_key({**key_parts, "tokenizer": tokenizer_digest(tokenizer)})
    directory = cache_dir / "shards" / key
    with contextlib.suppress(DamagedShards):  # looked at again under the lock
        shards = open_shards(directory)
        if shards is not None:
            return shards, False
    with _build_lock(directory.parent, say):
        try:
            shards = open_shards(directory)  # built (or healed) by whoever held the lock before us
        except DamagedShards as e:
            say(f"cached shards in {directory} are incomplete or damaged ({e}): rebuilding")
            discard(directory)
            shards = None
        if shards is not None:
            return shards, False
        for p in remove_leftovers(directory.parent, keep=directory.name):
            say(f"removed {p}, left by a build that was killed")
        if (directory.parent / f".{directory.name}.partial" / "progress.json").is_file():
            say(f"continuing the interrupted build in {directory.parent / f'.{directory.name}.partial'}")
        return build_shards(directory, source(), tokenizer, key_parts, progress=progress), True


def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of the tokenizer's saved JSON (vocabulary, merges, normaliser ...)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokenizer.json"
        tokenizer.save(path)
        return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _build_lock(shard_root: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Holds <cache>/shards/.lock exclusively: other builds in this cache wait."""
    shard_root.mkdir(parents=True, exist_ok=True)
    with open(shard_root / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process's token-shard build in {shard_root} ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def discard(directory: Path) -> None:
    """Removes a damaged cache entry: renamed to a hidden `.<key>.<random>.tmp` first, so a
    kill mid-removal leaves only what remove_leftovers clears, never a half-deleted entry."""
    trash = directory.with_name(f".{directory.name}.{os.urandom(4).hex()}.tmp")
    os.replace(directory, trash)
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash)
    else:
        trash.unlink()


def remove_leftovers(shard_root: Path, keep: str) -> list[Path]:
    """Removes what killed builds left: `.<key>.*.tmp` directories (damaged entries being
    discarded, or builds from before they were resumable) and the `.<key>.partial` ones of
    keys other than `keep` (only a build of its own key resumes a partial one; a changed
    file or tokenizer never does). Call under the build lock, so that none of them is in
    use. Returns what was removed."""
    removed = []
    for p in shard_root.glob(".*"):
        if p.is_dir() and (p.name.endswith(".tmp") or (p.name.endswith(".partial") and p.name != f".{keep}.partial")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def build_shards(
    directory: Path, source: UnitSource, tokenizer: Any, key_parts: dict[str, Any], *, progress: bool = False
) -> TokenShards:
    """Tokenises `source` into `directory`: streamed, resumable, renamed into place when done."""
    dtype = token_dtype(tokenizer.vocab_size)
    partial = directory.parent / f".{directory.name}.partial"
    while True:
        with naming(partial):  # the files name themselves; this names what else fails
            state = _resume_state(partial, source.plan, dtype)
            _stream(partial, source, tokenizer, dtype, state, progress)
        replacement = source.finish()
        if replacement is None:
            break
        shutil.rmtree(partial)  # the split changed: what was written is on the wrong sides
        source = replacement
    meta = _meta(partial, state, tokenizer.vocab_size, dtype, key_parts)
    atomic_write_text(partial / "meta.json", json.dumps(meta, indent=1) + "\n")
    (partial / "progress.json").unlink()
    fsync_dir(partial)
    os.replace(partial, directory)
    fsync_dir(directory.parent)
    return _mapped(directory, meta)


def _resume_state(partial: Path, plan: str, dtype: np.dtype) -> dict[str, Any]:
    """The recorded progress of a build in `partial` under `plan` (its files cut back to it),
    or a fresh start."""
    fresh = {
        "plan": plan,
        "dtype": dtype.name,
        "units": 0,
        "text_bytes": 0,
        "train_tokens": 0,
        "val_tokens": 0,
        "train_units": 0,
        "val_units": 0,
    }
    try:
        state = json.loads((partial / "progress.json").read_text())
    except (OSError, json.JSONDecodeError):
        state = None
    if not isinstance(state, dict) or {k: state.get(k) for k in ("plan", "dtype")} != {
        "plan": plan,
        "dtype": dtype.name,
    }:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for split in ("train", "val"):
            (partial / f"{split}.bin").touch()
        return fresh
    for split in ("train", "val"):  # anything written after the record is redone
        os.truncate(partial / f"{split}.bin", state[f"{split}_tokens"] * dtype.itemsize)
    return state


def _stream(
    partial: Path, source: UnitSource, tokenizer: Any, dtype: np.dtype, state: dict[str, Any], progress: bool
) -> None:
    """Appends the tokens of every unit after the first state['units'] to the two files,
    recording progress in `state` and on disk every CHECKPOINT_BYTES of text."""
    from tqdm import tqdm

    skip, since_record = state["units"], 0
    # On a terminal only: a CLI's stderr otherwise holds nothing but its one-line errors.
    bar = tqdm(
        total=source.total_bytes,
        initial=state["text_bytes"],
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="tokenising",
        disable=not (progress and sys.stderr.isatty()),
        mininterval=1.0,
        smoothing=0.1,
    )
    start, tokens_at_start = time.perf_counter(), state["train_tokens"] + state["val_tokens"]
    with open(partial / "train.bin", "ab") as train_f, open(partial / "val.bin", "ab") as val_f, bar:
        for batch in _batches(source.units(), skip):
            n_bytes = _write_batch(batch, tokenizer, dtype, (train_f, val_f), state)
            bar.update(n_bytes)
            tokens = state["train_tokens"] + state["val_tokens"] - tokens_at_start
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s", refresh=False)
            since_record += n_bytes
            if since_record >= CHECKPOINT_BYTES:
                _record(partial, state, (train_f, val_f))
                since_record = 0
        _record(partial, state, (train_f, val_f))


def _batches(units: Iterable[tuple[bool, str]], skip: int) -> Iterator[list[tuple[bool, str]]]:
    """Units after the first `skip`, grouped up to BATCH_BYTES of text / BATCH_UNITS units."""
    batch: list[tuple[bool, str]] = []
    size = 0
    for i, unit in enumerate(units):
        if i < skip:
            continue
        batch.append(unit)
        size += len(unit[1])
        if size >= BATCH_BYTES or len(batch) >= BATCH_UNITS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _write_batch(
    batch: list[tuple[bool, str]], tokenizer: Any, dtype: np.dtype, files: tuple[Any, Any], state: dict[str, Any]
) -> int:
    """Encodes one batch and appends each unit's ids to its side's file; returns its text size."""
    pieces, owners = [], []
    for i, (_, text) in enumerate(batch):
        cut = split_at_lines(text, PIECE_CHARS)
        pieces += cut
        owners += [i] * len(cut)
    encoded = tokenizer.encode_batch(pieces)
    sides: list[list[list[int]]] = [[], []]
    for owner, ids in zip(owners, encoded):
        sides[batch[owner][0]].append(ids)
    for is_val, (f, id_lists) in enumerate(zip(files, sides)):
        n = sum(map(len, id_lists))
        with naming(f.name):
            f.write(np.fromiter(itertools.chain.from_iterable(id_lists), dtype=dtype, count=n).tobytes())
        name = "val" if is_val else "train"
        state[f"{name}_tokens"] += n
        state[f"{name}_units"] += sum(1 for v, _ in batch if v == bool(is_val))
    state["units"] += len(batch)
    n_bytes = sum(len(t) for _, t in batch)
    state["text_bytes"] += n_bytes
    return n_bytes


def split_at_lines(text: str, size: int) -> list[str]:
    """`text` in pieces of about `size` characters, each cut after a newline (a piece runs on
    to the next newline when there is none within `size`). Tokens never span a newline, so
    the pieces' tokens, concatenated, are the text's."""
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = text.rfind("\n", start, start + size) + 1 if start + size < len(text) else len(text)
        if end <= start:
            end = text.find("\n", start + size) + 1 or len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def _record(partial: Path, state: dict[str, Any], files: tuple[Any, Any]) -> None:
    """Makes the tokens written so far durable, then says so (progress.json)."""
    for f in files:
        with naming(f.name):
            f.flush()
            os.fsync(f.fileno())
    atomic_write_text(partial / "progress.json", json.dumps(state) + "\n")


def _meta(
    partial: Path, state: dict[str, Any], vocab_size: int, dtype: np.dtype, source: dict[str, Any]
) -> dict[str, Any]:
    """meta.json's content: counts, the unigram statistics and each file's integrity record
    (engine.data.integrity), read back from the files in one pass each."""
    n_train, n_val = state["train_tokens"], state["val_tokens"]
    if n_train == 0:
        raise ValueError("the training split holds no tokens after tokenisation")
    records = {name: FileRecord(DIGEST_BYTES) for name in ("train.bin", "val.bin")}
    counts = np.zeros(vocab_size, dtype=np.int64)
    for chunk in _chunks(partial / "train.bin", dtype):
        records["train.bin"].add(chunk)
        counts += np.bincount(chunk, minlength=vocab_size)
    p = counts[counts > 0] / n_train
    q = (counts + 1) / (n_train + vocab_size)
    log_q = 0.0  # one chunk sums exactly as numpy's mean of the whole did before the stream
    for chunk in _chunks(partial / "val.bin", dtype):
        records["val.bin"].add(chunk)
        log_q += float(np.log(q[chunk]).sum())
    return {
        "version": SHARD_VERSION,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "train_documents": state["train_units"],
        "val_documents": state["val_units"],
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "unigram_entropy": float(-(p * np.log(p)).sum()),
        "val_unigram_cross_entropy": -log_q / n_val if n_val else math.nan,
        "source": source,
        "integrity": {"block_bytes": DIGEST_BYTES, **{name: r.result() for name, r in records.items()}},
    }


def _chunks(path: Path, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The file's tokens, STATS_CHUNK at a time: read, not memory-mapped, since mapped pages
    stay in the process's resident memory and would grow it with the corpus."""
    with open(path, "rb") as f:
        while (chunk := np.fromfile(f, dtype=dtype, count=STATS_CHUNK)).size:
            yield chunk
