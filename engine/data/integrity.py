"""Content integrity of token shards: what each file held when it was built, and whether it still does.

A build records, per file, the SHA-256 of every DIGEST_BYTES block and the largest token id
(meta.json's "integrity"); opening a cache entry reads the files again and compares, so
damage that keeps a file's size (random bytes, a zeroed block from a torn write) is seen
before a run trains on it. A difference is located to its block. The check reads every byte
once at the speed of OpenSSL's SHA-256 (bench/results/shard-digest-*.txt).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

DIGEST_BYTES = 64 << 20  # bytes per digest: a difference is located to this much of a file
READ_BYTES = 1 << 20  # what a check holds in memory at a time


class DamagedShards(ValueError):
    """A shard directory that is incomplete or whose content differs from what was built;
    the message says what (a file, a range of bytes, a field of meta.json)."""


class FileRecord:
    """The integrity record of one file, fed its tokens in order: the SHA-256 of each
    `block` bytes and the largest token id."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.digests: list[str] = []
        self.max_token_id: int | None = None
        self._hash, self._filled = hashlib.sha256(), 0

    def add(self, tokens: np.ndarray) -> None:
        if tokens.size:
            self.max_token_id = max(int(tokens.max()), self.max_token_id or 0)
        data = memoryview(np.ascontiguousarray(tokens)).cast("B")
        while len(data):
            take = min(len(data), self.block - self._filled)
            self._hash.update(data[:take])
            self._filled, data = self._filled + take, data[take:]
            if self._filled == self.block:
                self._close_block()

    def result(self) -> dict[str, Any]:
        if self._filled:
            self._close_block()
        return {"sha256": self.digests, "max_token_id": self.max_token_id}

    def _close_block(self) -> None:
        self.digests.append(self._hash.hexdigest())
        self._hash, self._filled = hashlib.sha256(), 0


def check_file(path: Path, record: dict[str, Any], block: int, vocab_size: int) -> None:
    """Raises DamagedShards when `path` differs from its build-time `record` (its size is
    already known to be right)."""
    max_id, digests = record.get("max_token_id"), record.get("sha256")
    if not isinstance(digests, list) or not (max_id is None or isinstance(max_id, int)):
        raise DamagedShards(f"meta.json's integrity record of {path.name} is malformed")
    if max_id is not None and max_id >= vocab_size:
        raise DamagedShards(
            f"meta.json records token id {max_id} in {path.name}, outside the vocabulary of {vocab_size}"
        )
    size = path.stat().st_size
    if len(digests) != -(-size // block):
        raise DamagedShards(f"meta.json's {len(digests)} digests do not cover the {size:,} bytes of {path.name}")
    buffer = memoryview(bytearray(min(block, READ_BYTES)))
    with open(path, "rb") as f:
        for i, expected in enumerate(digests):
            if _block_digest(f, buffer, block) != expected:
                end = min((i + 1) * block, size)
                raise DamagedShards(f"{path.name}: bytes {i * block:,}-{end:,} differ from the build's digest")


def _block_digest(f: Any, buffer: memoryview, block: int) -> str:
    """SHA-256 of the next `block` bytes of `f` (fewer at the end), read through `buffer`."""
    digest, left = hashlib.sha256(), block
    while left:
        n = f.readinto(buffer[: min(left, len(buffer))])
        if not n:
            break
        digest.update(buffer[:n])
        left -= n
    return digest.hexdigest()
