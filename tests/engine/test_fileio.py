"""Atomic writes: permissions follow the umask, failures name the file and leave nothing."""

import errno
import os
import stat

import pytest
import torch

from engine import fileio


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_temp_dirs_honour_the_umask(tmp_path, umask_022):
    fileio.atomic_write_text(tmp_path / "a.json", "{}")
    assert mode(tmp_path / "a.json") == 0o644  # mkstemp alone gives 0600
    assert mode(fileio.make_temp_dir(tmp_path / "d")) == 0o755  # mkdtemp alone gives 0700
    # safetensors (0.8) writes its file with mode 0600 whatever was there before.
    from safetensors.torch import save_file

    fileio.atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, str(tmp)))
    assert mode(tmp_path / "w.safetensors") == 0o644
    os.umask(0o077)
    fileio.atomic_write_text(tmp_path / "b.json", "{}")
    assert mode(tmp_path / "b.json") == 0o600  # a stricter umask is honoured too
    assert fileio.current_umask() == 0o077


def test_a_failed_write_names_the_file_keeps_the_old_one_and_leaves_no_temp(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_text("old")

    def full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="weights.bin") as info:
        fileio.atomic_write(target, full)
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_a_read_only_file_system_at_the_rename_leaves_no_temp(tmp_path, monkeypatch):
    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fileio.os, "replace", read_only)
    with pytest.raises(OSError, match="Read-only file system.*x.json"):
        fileio.atomic_write_text(tmp_path / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_library_writer_that_hides_the_os_error_still_names_the_file(writer, tmp_path):
    """Issue 23, fault 4: safetensors reports a full disk as SafetensorError and torch.save as
    RuntimeError('unexpected pos ...'): a traceback instead of one line naming the file."""
    from faults import file_size_limit
    from safetensors.torch import save_file

    target = tmp_path / "big.bin"
    tensors = {"x": torch.zeros(64 << 10)}  # 256 KiB
    with file_size_limit(64 << 10), pytest.raises(OSError) as caught:
        if writer == "safetensors":
            fileio.atomic_write(target, lambda tmp: save_file(tensors, str(tmp)))
        else:
            fileio.atomic_write_stream(target, lambda f: torch.save(tensors, f))
    assert caught.value.errno == errno.EFBIG and caught.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []  # no temporary left
    fileio.atomic_write_stream(target, lambda f: torch.save(tensors, f))  # the limit lifted
    assert torch.equal(torch.load(target, weights_only=True)["x"], tensors["x"])


def test_a_writer_s_own_mistakes_are_not_made_environment_faults(tmp_path):
    def mistaken(f):
        f.write(b"half")
        raise TypeError("the writer's own")

    with pytest.raises(TypeError, match="the writer's own"):
        fileio.atomic_write_stream(tmp_path / "x.pt", mistaken)
    with pytest.raises(ZeroDivisionError):
        fileio.atomic_write(tmp_path / "y.bin", lambda tmp: 1 / 0)
    assert list(tmp_path.iterdir()) == []
