"""The Triton kernels' import name: the repository's kernels/ folder is the package `gpt1_kernels`.

PyPI's `kernels` is Hugging Face's (transformers imports it), so ours never takes that name.
kernels/ has no __init__.py, so from the checkout's root `import kernels` still finds theirs.
pip installs the folder as gpt1_kernels (setup.py's package_dir); an engine run from a checkout
(editable install, PYTHONPATH, the GPU machine's plain copy) registers that checkout's folder
here. Each kernels/<op>.py holds @triton.jit kernels and launchers named like the gpt1:: ops
(engine/ops.py), no autograd; their specs are in engine/model/reference.py.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

NAME = "gpt1_kernels"
CHECKOUT = Path(__file__).resolve().parent.parent
FOLDER = CHECKOUT / "kernels"  # in a checkout; in site-packages this is Hugging Face's package


def kernels_package() -> ModuleType:
    """The package gpt1_kernels: this checkout's kernels/ folder, else the installed one."""
    if NAME in sys.modules:
        return sys.modules[NAME]
    if not (CHECKOUT / "setup.py").is_file():  # pip-installed: kernels/ went in as gpt1_kernels
        return importlib.import_module(NAME)
    spec = importlib.machinery.ModuleSpec(NAME, None, is_package=True)
    spec.submodule_search_locations = [str(FOLDER)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    return module


def kernel_module(name: str) -> ModuleType:
    """gpt1_kernels.<name>, e.g. kernel_module("attention")."""
    kernels_package()
    return importlib.import_module(f"{NAME}.{name}")
