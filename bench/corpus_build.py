"""The streaming corpus build against the tokenizers library's own batch encoding.

    python -m bench.corpus_build --size-mb 2048 --workdir /tmp/corpus-bench     # the real measurement
    python -m bench.corpus_build --size-mb 50 --workdir /tmp/corpus-bench       # a quick check

1. Generates the corpus once (kept in --workdir): Shakespeare's lines (the embedded corpus's
   training works) reshuffled by a seeded RNG into 1 MB files, --size-mb of them.
2. Builds the token shards as a user would, in a fresh process with a cold cache:
   ``python -m engine.pretrain --prepare-only --data DIR --tokenizer TOK``; its wall time and
   peak RSS (the child's ru_maxrss: everything, the Python and torch imports included).
3. The baseline, in another fresh process: the same files, 16 at a time (one input each),
   through ``tokenizers.Tokenizer.encode_batch`` of the same tokenizer; only the encode
   calls are timed (not reading the files), and the ids are taken out of the encodings, as
   any user of them must. encode_batch_fast (no offsets; what the build calls) is timed
   too, for reference.

Prints MB/s (of UTF-8 text, 2^20 bytes) and tokens/s of each, their ratio, and peak RSS; the
goals (issue 13) are peak RSS <= 1 GiB and build/encode_batch >= 0.8 on a >= 2 GB corpus.
The tokenizer is --tokenizer, or a --vocab-size BPE trained on the embedded corpus (cached in
--workdir). Timings mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FILE_BYTES = 1 << 20
BASELINE_BATCH = 16  # files (1 MB each) per encode_batch call: enough inputs to keep 16 cores busy


def make_corpus(directory: Path, size_mb: int, seed: int = 0) -> Path:
    """--size-mb files of about 1 MB of reshuffled Shakespeare lines (reused when complete)."""
    done = directory / ".complete"
    if done.is_file() and done.read_text() == f"{size_mb} {seed}":
        return directory
    from engine.data.corpus import read_documents, shakespeare_split

    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    lines = [line for d in read_documents(shakespeare_split()[0]) for line in d.text.splitlines() if line.strip()]
    rng = random.Random(seed)
    per_file = FILE_BYTES // (sum(map(len, lines[:10000])) // 10000 + 1)
    for i in range(size_mb):
        (directory / f"part{i:05d}.txt").write_text("\n".join(rng.choices(lines, k=per_file)) + "\n")
    done.write_text(f"{size_mb} {seed}")
    return directory


def tokenizer_file(workdir: Path, given: str | None, vocab_size: int) -> Path:
    if given:
        return Path(given)
    path = workdir / f"bpe-shakespeare-{vocab_size}.json"
    if not path.is_file():
        from engine.data.corpus import read_documents, shakespeare_split
        from engine.model.tokenizer import BPETokenizer

        docs = read_documents(shakespeare_split()[0])
        BPETokenizer.train(texts=[d.text for d in docs], vocab_size=vocab_size).save(path)
    return path


def run_build(corpus: Path, tokenizer: Path, cache: Path) -> dict[str, Any]:
    """`pretrain --prepare-only` in a fresh process on a cold cache: seconds, peak RSS, tokens."""
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "engine.pretrain",
        "--prepare-only",
        "--data",
        str(corpus),
        "--tokenizer",
        str(tokenizer),
        "--cache-dir",
        str(cache),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the build failed: {proc.stderr.strip()[-2000:]}")
    (meta_path,) = (cache / "shards").glob("*/meta.json")
    meta = json.loads(meta_path.read_text())
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far: this one
    return {"seconds": seconds, "tokens": meta["train_tokens"] + meta["val_tokens"], "peak_rss_mb": peak_kib / 1024}


def baseline(corpus: Path, tokenizer: Path, method: str) -> dict[str, Any]:
    """The library's own batch encoding over the same files, in the build's batch size."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    encode = getattr(tok, method)
    seconds, tokens = 0.0, 0
    files = sorted(corpus.glob("*.txt"))
    for i in range(0, len(files), BASELINE_BATCH):
        batch = [path.read_text(encoding="utf-8") for path in files[i : i + BASELINE_BATCH]]
        t0 = time.perf_counter()
        tokens += sum(len(e.ids) for e in encode(batch, add_special_tokens=False))
        seconds += time.perf_counter() - t0
    return {"seconds": seconds, "tokens": tokens}


def run_baseline(corpus: Path, tokenizer: Path, method: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.corpus_build",
        "--baseline",
        method,
        "--corpus",
        str(corpus),
        "--tokenizer",
        str(tokenizer),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=_env())
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def report(text_mb: float, build: dict[str, Any], base: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def rates(r: dict[str, Any]) -> dict[str, float]:
        return {"mb_per_s": text_mb / r["seconds"], "tokens_per_s": r["tokens"] / r["seconds"]}

    out = {
        "text_mb": round(text_mb, 1),
        "build": {**build, **rates(build)},
        **{k: {**v, **rates(v)} for k, v in base.items()},
    }
    out["ratio_vs_encode_batch"] = out["build"]["mb_per_s"] / out["encode_batch"]["mb_per_s"]
    out["ratio_vs_encode_batch_fast"] = out["build"]["mb_per_s"] / out["encode_batch_fast"]["mb_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.corpus_build", description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=2048, help="corpus size in 1 MB files (default: 2048)")
    p.add_argument("--workdir", default="/tmp/gpt1-corpus-bench", help="where the corpus, tokenizer and cache go")
    p.add_argument("--tokenizer", help="a tokenizer.json (default: a --vocab-size BPE trained on the embedded corpus)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--json", action="store_true", help="print the results as one JSON line")
    p.add_argument("--baseline", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.baseline:  # the child of run_baseline
        print(json.dumps(baseline(Path(args.corpus), Path(args.tokenizer), args.baseline)))
        return 0
    if args.size_mb <= 0:
        p.error(f"--size-mb must be positive, got {args.size_mb}")
    workdir = Path(args.workdir)
    corpus = make_corpus(workdir / f"corpus-{args.size_mb}mb", args.size_mb)
    tokenizer = tokenizer_file(workdir, args.tokenizer, args.vocab_size)
    text_mb = sum(p.stat().st_size for p in corpus.glob("*.txt")) / 2**20
    build = run_build(corpus, tokenizer, workdir / "cache")
    base = {m: run_baseline(corpus, tokenizer, m) for m in ("encode_batch", "encode_batch_fast")}
    out = report(text_mb, build, base)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"corpus {out['text_mb']} MB of text in 1 MB files; tokenizer {tokenizer} ({os.cpu_count()} CPUs)")
    for name in ("build", "encode_batch", "encode_batch_fast"):
        r = out[name]
        rss = f", peak RSS {r['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in r else ""
        print(
            f"  {name:18s} {r['seconds']:8.1f} s  {r['mb_per_s']:7.2f} MB/s  {r['tokens_per_s']:12,.0f} tokens/s{rss}"
        )
    print(
        f"  build / encode_batch = {out['ratio_vs_encode_batch']:.2f} (goal >= 0.8); "
        f"build / encode_batch_fast = {out['ratio_vs_encode_batch_fast']:.2f}; peak RSS goal <= 1024 MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
