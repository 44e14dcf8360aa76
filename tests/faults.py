"""Environment faults for tests, made by the kernel rather than mocked.

file_size_limit(n): in this process, write(2) past byte n of any file fails with EFBIG ("File
too large"), as a full disk fails it with ENOSPC: an errno and no file name, through every
writer — Python's files, torch.save's C++ writer, safetensors' Rust one. SIGXFSZ, which would
kill the process, is ignored meanwhile. Nothing in the block may write a big file it expects
to keep (pytest's own output files included: print nothing there).
"""

from __future__ import annotations

import contextlib
import resource
import signal
from typing import Iterator


@contextlib.contextmanager
def file_size_limit(n: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
