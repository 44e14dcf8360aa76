"""A damaged token cache heals or refuses by name (issue 23): an entry that is incomplete or
whose bytes differ from what was built is reported in one line and rebuilt in place, never
trained on and never in the way of its own rebuild; a token id outside the vocabulary met in
training names the shard file and offset."""

import errno
import json
import os

import numpy as np
import pytest

from engine.data import shards as shards_module
from engine.data.corpus import Document
from engine.data.shards import ListSource, load_or_build_shards, open_shards
from engine.data.windows import RandomWindows, eval_batches
from engine.model.tokenizer import BPETokenizer

TEXTS = ["the cat sat on the mat", "a dog ate the cat's dinner", "to be or not to be", "the end of the story"]
KEY = {"files": [["a", 1, 2]]}


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train(texts=TEXTS * 5, vocab_size=80)


def docs():
    # enough text for several digest blocks once DIGEST_BYTES is made small
    train = [Document(f"d{i}", " ".join(TEXTS[i % 3] for _ in range(40))) for i in range(30)]
    return ListSource(train, [Document("v", TEXTS[3])])


def build(tmp_path, tokenizer, said=None):
    return load_or_build_shards(tmp_path, KEY, docs, tokenizer, say=(said.append if said is not None else print))


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(shards_module, "DIGEST_BYTES", 512)


def truncate(d):
    with open(d / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(d / "train.bin") - 3)


def overwrite(d, data, at=1024):
    with open(d / "train.bin", "r+b") as f:
        f.seek(at)
        f.write(data)


DAMAGE = {
    "train.bin cut by 3 bytes": truncate,
    "train.bin deleted": lambda d: (d / "train.bin").unlink(),
    "meta.json not JSON": lambda d: (d / "meta.json").write_text("{"),
    "meta.json deleted": lambda d: (d / "meta.json").unlink(),
    "random bytes inside train.bin": lambda d: overwrite(d, np.random.default_rng(0).bytes(256)),
    "a zeroed block inside train.bin": lambda d: overwrite(d, bytes(256)),  # a torn write: ids still in range
    "meta.json from before digests": lambda d: (d / "meta.json").write_text(
        json.dumps({k: v for k, v in json.loads((d / "meta.json").read_text()).items() if k != "integrity"})
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_named_and_rebuilt_in_place(damage, tmp_path, tokenizer, small_blocks):
    """Issue 23, faults 1 and 2: the rebuild failed on the damaged directory ('Directory not
    empty') and content damage went unnoticed."""
    first, _ = build(tmp_path, tokenizer)
    good = {name: (first.directory / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}
    DAMAGE[damage](first.directory)
    said = []
    again, built = build(tmp_path, tokenizer, said)
    assert built and again.directory == first.directory
    notes = [m for m in said if "incomplete or damaged" in m]
    assert len(notes) == 1 and str(first.directory) in notes[0] and notes[0].endswith(": rebuilding")
    for name, data in good.items():
        assert (again.directory / name).read_bytes() == data, name
    assert sorted(p.name for p in again.directory.parent.iterdir()) == [".lock", again.directory.name]
    assert build(tmp_path, tokenizer)[1] is False  # healed: the next run reuses it


def test_the_note_locates_changed_bytes(tmp_path, tokenizer, small_blocks):
    first, _ = build(tmp_path, tokenizer)
    overwrite(first.directory, b"\xff\xff", at=1030)
    with pytest.raises(shards_module.DamagedShards, match=r"train\.bin: bytes 1,024-1,536 differ from the build's"):
        open_shards(first.directory)


def test_digests_and_largest_ids_are_recorded_at_build_time(tmp_path, tokenizer, small_blocks):
    shards, _ = build(tmp_path, tokenizer)
    record = shards.meta["integrity"]
    assert record["block_bytes"] == 512
    for split, tokens in (("train", shards.train), ("val", shards.val)):
        entry = record[f"{split}.bin"]
        assert entry["max_token_id"] == int(tokens.max()) < tokenizer.vocab_size
        assert len(entry["sha256"]) == -(-tokens.nbytes // 512)


def test_a_recorded_id_beyond_the_vocabulary_is_damage(tmp_path, tokenizer):
    shards, _ = build(tmp_path, tokenizer)
    meta = json.loads((shards.directory / "meta.json").read_text())
    meta["integrity"]["train.bin"]["max_token_id"] = tokenizer.vocab_size
    (shards.directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(shards_module.DamagedShards, match="outside the vocabulary"):
        open_shards(shards.directory)


def test_no_directory_is_not_damage(tmp_path):
    assert open_shards(tmp_path / "absent") is None


def test_an_out_of_range_id_met_in_training_names_the_file_and_offset(tmp_path, tokenizer):
    """Issue 23, fault 2: 'input_ids holds token id 32730, outside [0, 256)' named no file,
    and --resume replayed the same windows."""
    shards, _ = build(tmp_path, tokenizer)
    train = shards.train
    windows = RandomWindows(train, 9, 4, seed=0, vocab_size=tokenizer.vocab_size)
    at = int(windows.offsets(3)[2]) + 5
    with open(shards.directory / "train.bin", "r+b") as f:  # changed after the run opened it
        f.seek(at * train.itemsize)
        f.write(np.array([tokenizer.vocab_size + 7], dtype=train.dtype).tobytes())
    windows(2, 0, 4)  # other windows are fine
    with pytest.raises(OSError) as caught:
        windows(3, 0, 4)
    e = caught.value
    assert e.errno == errno.EIO and e.filename == str(shards.directory / "train.bin")
    assert f"token id {tokenizer.vocab_size + 7} at token {at:,}" in e.strerror
    assert f"byte {at * train.itemsize:,}" in e.strerror and "rebuil" in e.strerror
    val = np.full(20, tokenizer.vocab_size, dtype=np.uint16)
    with pytest.raises(OSError, match=f"token id {tokenizer.vocab_size} at token 0 "):
        next(eval_batches(val, 9, 2, vocab_size=tokenizer.vocab_size))


def test_a_full_disk_names_the_shard_file_and_the_next_build_recovers(tmp_path, tokenizer):
    """Issue 23, fault 4: the shard writer's failed write() said 'No space left on device'
    and named no file."""
    from faults import file_size_limit

    from engine.cli import os_error_line

    clean, _ = build(tmp_path / "clean", tokenizer)
    with file_size_limit(4096), pytest.raises(OSError) as caught:
        build(tmp_path, tokenizer, [])
    e = caught.value
    partial = tmp_path / "shards" / f".{clean.directory.name}.partial"
    assert e.errno == errno.EFBIG and e.filename == str(partial / "train.bin")
    assert os_error_line(e) == f"{partial / 'train.bin'}: File too large"
    again, built = build(tmp_path, tokenizer)  # space freed: the build completes
    assert built and again.train.tolist() == clean.train.tolist() and again.meta == clean.meta
