"""Builds the C++ extension engine._C (CPU kernels of the gpt1:: ops) from csrc/.

    pip install --no-build-isolation -e .      # torch must already be installed

Where the package is used from a checkout without installing (PYTHONPATH only),
engine.ops JIT-builds the same sources with torch.utils.cpp_extension.load.
"""

import sys
from pathlib import Path

from setuptools import find_packages, setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "engine"))
from _build import CXX_FLAGS, LD_FLAGS, sources  # noqa: E402  (engine/ itself imports torch lazily)

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    # pip's default isolated build environment holds only [build-system] requires, never torch
    # (listing it there would pull a second, multi-GB torch): say what to run, in one sentence.
    sys.exit(
        "error: building engine._C needs torch importable in the build environment, which pip's "
        'isolated build does not have; run `pip install "torch>=2.5" && pip install --no-build-isolation -e .` instead'
    )

setup(
    # kernels/ is imported as gpt1_kernels: PyPI's `kernels` is Hugging Face's (engine/_kernels.py)
    packages=find_packages(include=["engine", "engine.*"]) + ["gpt1_kernels"],
    package_dir={"gpt1_kernels": "kernels"},
    ext_modules=[
        CppExtension(
            "engine._C",
            [str(Path(s).relative_to(Path(__file__).resolve().parent)) for s in sources()],
            extra_compile_args=CXX_FLAGS,
            extra_link_args=LD_FLAGS,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
