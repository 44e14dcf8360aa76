"""How the C++ extension is built: one spec shared by setup.py (ahead of time) and the
JIT loader in engine.ops (where the package was not pip-installed, as on the GPU machine)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def sources() -> list[str]:
    """Every C++ file in csrc/, sorted so builds are reproducible."""
    return sorted(str(p) for p in CSRC.glob("*.cpp"))


def inputs() -> list[str]:
    """Every file a build depends on (sources and csrc/ headers): a prebuilt engine._C older
    than any of them is stale."""
    return sources() + sorted(str(p) for p in CSRC.glob("*.h"))


# -O3 and OpenMP (at::parallel_for runs on OpenMP in torch's CPU builds; without -fopenmp
# its pragma is ignored and every kernel runs on one thread; the kernels' `omp simd`
# reductions need it too). No -march=native: the binary may run on another machine than the
# one that built it; the hot loops are multiversioned instead (GPT1_SIMD in csrc/common.h:
# AVX-512 / AVX2 / baseline picked at load time). -fno-math-errno lets libm calls vectorise.
# The C++ standard is torch's own (cpp_extension adds it).
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
LD_FLAGS = ["-fopenmp"]
