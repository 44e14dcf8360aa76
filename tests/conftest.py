"""Shared test set-up: Triton runs under its interpreter where there is no GPU, and the
shared tolerances in tests/helpers.py are importable from every test directory."""

import os
import sys
from pathlib import Path

import torch

# Must be set before anything imports triton: on a CPU-only machine the Triton kernels run
# (slowly, at small shapes) on the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine._kernels import kernels_package  # noqa: E402

kernels_package()  # `import gpt1_kernels` works in a plain checkout too (tests/ops import it)
