"""What the token cache's content check costs: opening a cache entry reads every byte and
compares SHA-256 digests (engine.data.integrity).

    python -m bench.corpus_build --size-mb 2048 --workdir /tmp/gpt1-corpus-bench   # the issue's corpus, once
    python -m bench.shard_verify --cache /tmp/gpt1-corpus-bench/cache             # open_shards on each entry
    python -m bench.shard_verify --make-mb 256 --workdir /tmp/shard-verify         # a file of random ids

Prints, per file or entry, its size and the best of --repeat timings (the page cache warm after
the first) of: reading it, hashing it (the check itself), and for --cache open_shards whole
(sizes, digests, mapping). Timings mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import Callable

import numpy as np

from engine.data.integrity import DIGEST_BYTES, READ_BYTES, DamagedShards, FileRecord, check_file
from engine.data.shards import open_shards


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_all(path: Path) -> None:
    buffer = bytearray(READ_BYTES)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def report(name: str, n_bytes: int, seconds: dict[str, float]) -> None:
    rates = ", ".join(f"{k} {s:.2f} s ({n_bytes / s / 1e9:.2f} GB/s)" for k, s in seconds.items())
    print(f"{name}: {n_bytes / 1e9:.3f} GB; {rates}", flush=True)


def random_file(workdir: Path, megabytes: int) -> tuple[Path, dict]:
    """A uint16 file of random ids (--make-mb MB) and its build-time integrity record."""
    workdir.mkdir(parents=True, exist_ok=True)
    path, record = workdir / f"random-{megabytes}mb.bin", FileRecord(DIGEST_BYTES)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for _ in range(megabytes):
            chunk = rng.integers(0, 40478, size=1 << 19, dtype=np.uint16)  # 1 MiB
            record.add(chunk)
            f.write(chunk.tobytes())
    return path, record.result()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.shard_verify", description=__doc__.splitlines()[0])
    p.add_argument("--cache", help="a cache directory: time open_shards on each entry in CACHE/shards")
    p.add_argument("--make-mb", type=int, help="time the check of a file of random ids of this many MiB")
    p.add_argument("--workdir", default="/tmp/shard-verify", help="where --make-mb writes its file")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    print(f"sha256: hashlib ({hashlib.sha256().name}, OpenSSL {__import__('ssl').OPENSSL_VERSION})")
    if a.make_mb:
        path, record = random_file(Path(a.workdir), a.make_mb)
        seconds = {
            "read": best_seconds(lambda: read_all(path), a.repeat),
            "check": best_seconds(lambda: check_file(path, record, DIGEST_BYTES, 40478), a.repeat),
        }
        report(str(path), path.stat().st_size, seconds)
    for entry in sorted(Path(a.cache).glob("shards/[!.]*")) if a.cache else []:
        try:
            open_shards(entry)
        except DamagedShards as e:  # e.g. built before digests: a pretraining run rebuilds it
            print(f"{entry}: {e}", flush=True)
            continue
        files = [entry / "train.bin", entry / "val.bin"]
        seconds = {
            "read": best_seconds(lambda: [read_all(f) for f in files], a.repeat),
            "open_shards": best_seconds(lambda: open_shards(entry), a.repeat),
        }
        report(str(entry), sum(f.stat().st_size for f in files), seconds)


if __name__ == "__main__":
    main()
