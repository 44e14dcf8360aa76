"""Atomic file writes: a reader (or a crash) never sees a half-written file.

Temporaries are hidden names next to their target (``.NAME.<random>.tmp``, files and
directories alike), so a killed process leaves only something recognisable as garbage
(engine.training.checkpoint.clean_run_dir removes them). Files and directories made here honour
the umask like ``open``/``mkdir`` do, not mkstemp's 0600 / mkdtemp's 0700. A fault of the
environment (disk full, read-only file system, permissions) propagates as an OSError with the
target's path in it, also when a library's writer reported it as its own error type
(safetensors' SafetensorError, torch.save's RuntimeError: see write_error).
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

TMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process's umask (read from /proc on Linux; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_path(error: OSError, path: str | Path) -> OSError:
    """`error` naming `path` (a failed write() says only "No space left on device")."""
    if error.filename is not None:
        return error
    return type(error)(error.errno, error.strerror or str(error), str(path))


def write_error(error: BaseException, path: str | Path) -> OSError | None:
    """The environment fault behind a writer's failure, naming `path`: the OSError itself or
    one it was raised from, or the one a Rust writer (safetensors) names at the end of its
    message ("... (os error 28)"); None when the failure is not the environment's."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError):
            return with_path(cause, path)
        cause = cause.__cause__ or cause.__context__
    found = re.search(r"\(os error (\d+)\)", str(error))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Adds `path` to an OSError raised inside that names no file (as a failed write() does)."""
    try:
        yield
    except OSError as e:
        raise with_path(e, path) from e


def make_temp_dir(target: str | Path) -> Path:
    """A new hidden directory ``.NAME.<random>.tmp`` beside `target`, with the permissions
    mkdir would give it (0o777 & ~umask), to be renamed onto `target` once filled."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to `path`; on success it is fsynced and renamed onto
    `path` (atomic on POSIX), on error removed. The old file stays intact until the rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise with_path(e, path) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # The mode open() would give, set after the write: some writers (safetensors)
        # replace the file with one of their own at 0600.
        os.chmod(tmp_path, 0o666 & ~current_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except Exception as e:
        fault = write_error(e, path)
        if fault is None:
            raise
        raise fault from e
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Calls write(tmp_path), then atomically moves the result to `path`."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_stream(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Calls write(file) on a temporary file open for binary writing, then atomically moves it
    to `path`. An OSError from the file is what fails, even when the writer caught it and raised
    its own error instead (torch.save(obj, f) reports a full disk as "unexpected pos")."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        recording = _Recording(f)
        try:
            write(recording)
        except Exception:
            if recording.error is None:
                raise
            raise recording.error from None


class _Recording:
    """A binary file that keeps the first OSError its writes raised."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def fsync_dir(directory: str | Path) -> None:
    """Makes a rename inside `directory` durable (best effort: not every FS allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
