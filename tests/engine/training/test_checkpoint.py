"""Checkpoint I/O: the good/bad record, rotation, fallback from corrupt checkpoints, leaks
of killed processes, permissions and environment faults (no model: a Linear's state_dict)."""

import errno
import json
import os
import stat

import pytest
import torch

from engine.cli import UserError
from engine.training import checkpoint as ck


def write_weights(value):
    def write(directory):
        torch.save({"w": torch.full((4,), float(value))}, directory / "w.pt")

    return write


def save(run, step, *, good=True, keep=10, bad_steps=0):
    state = {"step": step, "bad_steps": bad_steps, "optimizer": {"m": torch.arange(3)}}
    return ck.save_checkpoint(run, step, state, write_weights(step), good=good, keep=keep)


def read_into(seen):
    def read(directory):
        seen.append(torch.load(directory / "w.pt", weights_only=True)["w"][0].item())

    return read


def names(run):
    return sorted(p.name for p in (run / ck.CHECKPOINTS).iterdir())


def test_a_checkpoint_records_that_it_is_good_and_its_file_sizes(tmp_path):
    path = save(tmp_path, 3)
    meta = json.loads((path / ck.CHECKPOINT_META).read_text())
    assert meta["step"] == 3 and meta["good"] is True and meta["bad_steps"] == 0
    assert meta["files"] == {p.name: p.stat().st_size for p in path.iterdir() if p.name != ck.CHECKPOINT_META}
    assert set(meta["files"]) == {"w.pt", ck.TRAINER_STATE}


def test_latest_checkpoint_never_returns_a_bad_one(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 4, good=False, bad_steps=1)
    assert ck.latest_checkpoint(tmp_path).name == "step_00000002"
    legacy = save(tmp_path, 6)  # as written before checkpoint.json existed, inside a streak
    (legacy / ck.CHECKPOINT_META).unlink()
    torch.save({"step": 6, "bad_steps": 4}, legacy / ck.TRAINER_STATE)
    assert ck.latest_checkpoint(tmp_path).name == "step_00000002"
    assert [p.name for p in ck.list_checkpoints(tmp_path, good_only=True)] == ["step_00000002"]


def test_rotation_keeps_the_newest_good_checkpoints(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step, keep=2)
    assert names(tmp_path) == ["step_00000004", "step_00000006"]
    save(tmp_path, 8, good=False, keep=2)  # a bad one pushes no good one out
    save(tmp_path, 10, good=False, keep=2)
    assert names(tmp_path) == ["step_00000004", "step_00000006", "step_00000008", "step_00000010"]
    save(tmp_path, 12, keep=2)  # a good one: the bad ones before it go with the oldest good one
    assert names(tmp_path) == ["step_00000006", "step_00000012"]
    (tmp_path / ck.CHECKPOINTS / "step_00000012" / "w.pt").write_bytes(b"x")  # damaged later
    save(tmp_path, 14, keep=2)  # the damaged one does not count: 6 stays
    assert names(tmp_path) == ["step_00000006", "step_00000014"]


def test_load_falls_back_to_the_newest_readable_checkpoint(tmp_path):
    for step in (2, 4, 6):
        save(tmp_path, step)
    root = tmp_path / ck.CHECKPOINTS
    weights = root / "step_00000006" / "w.pt"
    weights.write_bytes(weights.read_bytes()[:10])  # truncated
    state = root / "step_00000004" / ck.TRAINER_STATE
    state.write_bytes(b"\0" * state.stat().st_size)  # garbage of the right size
    warned, seen = [], []
    used, loaded = ck.load_checkpoint(root / "step_00000006", read_into(seen), warn=warned.append)
    assert used.name == "step_00000002" and loaded["step"] == 2 and seen == [2.0]
    (line,) = warned
    assert (
        "step_00000006 (w.pt has 10 bytes" in line
        and "step_00000004 (" in line
        and line.endswith("resuming from " + str(used) + ", the newest that reads")
    )
    # Given the run directory, the same search from its newest good checkpoint.
    assert ck.load_checkpoint(tmp_path, read_into([]), warn=warned.append)[0] == used


def test_a_named_checkpoint_that_is_missing_or_bad_is_said_and_skipped(tmp_path):
    save(tmp_path, 2)
    bad = save(tmp_path, 4, good=False, bad_steps=1)
    missing = tmp_path / ck.CHECKPOINTS / "step_00000006"
    for start, reason in ((bad, "saved inside a non-finite streak"), (missing, "no trainer_state.pt")):
        warned = []
        used, _ = ck.load_checkpoint(start, read_into([]), warn=warned.append)
        assert used.name == "step_00000002"
        assert len(warned) == 1 and f"{start} ({reason})" in warned[0]


def test_no_readable_checkpoint_is_an_error_naming_each(tmp_path):
    for step in (2, 4):
        save(tmp_path, step)
    for step in (2, 4):
        (tmp_path / ck.CHECKPOINTS / f"step_{step:08d}" / "w.pt").write_bytes(b"x")
    with pytest.raises(
        UserError, match=r"no readable checkpoint in .*checkpoints: .*step_00000004 \(.*step_00000002 \("
    ):
        ck.load_checkpoint(tmp_path, read_into([]), warn=lambda m: None)
    with pytest.raises(UserError, match="no good checkpoint found"):
        ck.load_checkpoint(tmp_path / "empty", read_into([]))


def test_weights_that_fail_to_load_fall_back_too(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 4)

    def picky(directory):
        if directory.name == "step_00000004":
            raise RuntimeError("Error(s) in loading state_dict: size mismatch")

    warned = []
    used, _ = ck.load_checkpoint(tmp_path, picky, warn=warned.append)
    assert used.name == "step_00000002" and "size mismatch" in warned[0]


def test_disk_full_leaves_the_finished_checkpoints_and_no_temporaries(tmp_path):
    save(tmp_path, 2)
    before = (tmp_path / ck.CHECKPOINTS / "step_00000002" / "w.pt").read_bytes()

    def full(directory):
        (directory / "w.pt").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"No space left on device \(writing checkpoint\): .*step_00000004") as info:
        ck.save_checkpoint(tmp_path, 4, {"step": 4}, full, good=True, keep=1)
    assert info.value.errno == errno.ENOSPC
    assert names(tmp_path) == ["step_00000002"]
    assert (tmp_path / ck.CHECKPOINTS / "step_00000002" / "w.pt").read_bytes() == before


def test_read_only_at_the_rename_keeps_everything(tmp_path, monkeypatch):
    save(tmp_path, 2)
    real = os.replace

    def read_only(src, dst):
        if str(dst).endswith("step_00000004"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", read_only)
    with pytest.raises(OSError, match="Read-only file system.*step_00000004"):
        save(tmp_path, 4, keep=1)
    assert names(tmp_path) == ["step_00000002"]


def test_checkpoints_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save(tmp_path, 2)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert {stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == {0o644}  # not mkstemp's 0600


def test_a_killed_rotation_leaves_only_recognisable_trash(tmp_path, monkeypatch):
    save(tmp_path, 2)
    save(tmp_path, 4)

    def killed(path, ignore_errors=False):
        raise KeyboardInterrupt  # the process dies between the rename and the delete

    monkeypatch.setattr(ck.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.rotate_checkpoints(tmp_path, keep=1)
    monkeypatch.undo()
    left = names(tmp_path)
    assert (
        left[-1] == "step_00000004"
        and len(left) == 2
        and left[0].startswith(".step_00000002.")
        and left[0].endswith(".trash")
    )
    ck.clean_run_dir(tmp_path)
    assert names(tmp_path) == ["step_00000004"]


def test_clean_run_dir_removes_only_the_leaks_of_killed_processes(tmp_path):
    run = tmp_path
    save(run, 2)
    root = run / ck.CHECKPOINTS
    leaks = [
        root / ".step_00000004.k2j3.tmp",
        root / ".step_00000002.ab12.trash",
        root / "step_00000006",
        run / ".metrics.jsonl.x8y9.tmp",
        run / ".best.q1w2.tmp",
    ]
    for p in leaks:
        if p.name.startswith(".metrics"):
            p.write_text("{}")
        else:
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"partial")
    keep = [run / "notes.txt", run / ".hidden", root / "step_00000002", run / "model.safetensors"]
    for p in keep[:2] + keep[3:]:
        p.write_text("mine")
    removed = ck.clean_run_dir(run)
    assert sorted(removed) == sorted(leaks)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in leaks)
    assert ck.clean_run_dir(run) == [] and ck.clean_run_dir(run / "missing") == []


def test_a_checkpoint_of_the_same_step_is_replaced(tmp_path):
    """After resuming from an older checkpoint, the run reaches the steps of the newer (here
    damaged or incomplete) ones again: the new checkpoint replaces them."""
    half = tmp_path / ck.CHECKPOINTS / "step_00000002"
    half.mkdir(parents=True)
    (half / "w.pt").write_bytes(b"old")
    save(tmp_path, 2)
    assert names(tmp_path) == ["step_00000002"] and ck.latest_checkpoint(tmp_path) == half
    assert torch.load(half / "w.pt", weights_only=True)["w"][0] == 2.0
    state = half / ck.TRAINER_STATE
    state.write_bytes(b"\0" * state.stat().st_size)  # garbage its record cannot see
    save(tmp_path, 2)
    assert ck.load_trainer_state(half)["step"] == 2 and names(tmp_path) == ["step_00000002"]


@pytest.mark.parametrize("limit, failing", [(8 << 10, "model.safetensors"), (256 << 10, ck.TRAINER_STATE)])
def test_a_full_disk_in_a_library_writer_is_one_line_naming_the_checkpoint(limit, failing, tmp_path):
    """Issue 23, fault 4: torch.save reported a full disk as RuntimeError('unexpected pos') and
    safetensors as SafetensorError: a traceback, no path. (A file-size limit makes the kernel
    fail write(2) as a full disk does, inside each library's own writer.)"""
    from faults import file_size_limit

    model = torch.nn.Linear(64, 64)  # 16 KiB of weights
    state = {"step": 4, "optimizer": {"m": torch.zeros(128 << 10)}}  # 512 KiB
    save(tmp_path, 2)
    with file_size_limit(limit), pytest.raises(OSError) as caught:
        ck.save_checkpoint(tmp_path, 4, state, lambda d: ck.STATE_DICT_WEIGHTS.save(model, d), good=True, keep=3)
    e = caught.value
    assert e.errno == errno.EFBIG and e.filename == str(ck.checkpoint_dir(tmp_path, 4))
    assert e.strerror == "File too large (writing checkpoint)" and failing in str(e.__cause__)
    assert names(tmp_path) == ["step_00000002"]  # nothing finished lost, no temporary left


def test_a_run_that_never_took_an_update_does_not_hold_out(tmp_path):
    """Issue 23: what a run writes before its first update (train_config.json, tokenizer.json)
    is no run to protect: --out is reused without --overwrite; once it logged or saved, it is."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ck.RUN_CONFIG).write_text("{}")
    (out / "tokenizer.json").write_text("{}")
    assert ck.prepare_run_dir(out, resume=False, overwrite=False) is None
    (out / ck.METRICS).write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="already holds a run"):
        ck.prepare_run_dir(out, resume=False, overwrite=False)
