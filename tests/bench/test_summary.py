"""bench/conftest.py's side-by-side summary: after pytest-benchmark's tables, medians, and a
slowdown that reads "slower"."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_conftest():
    """bench/conftest.py as a module, wherever pytest was started from."""
    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "bench" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


speed_text = _load_conftest().speed_text

# A no-op "benchmark": only the order of the report's sections is looked at, no timing.
TEST_FILE = """
def test_noop(benchmark, record):
    benchmark.pedantic(lambda: None, rounds=2, iterations=1)
    record("group", "eager", 0.001)
    record("group", "fused", 0.002)
"""


def test_ratio_below_one_reads_slower():
    assert speed_text(2.0, 1.0).strip() == "2.00x faster"
    assert speed_text(0.88, 1.0).strip() == "1.14x slower"
    assert speed_text(1.0, 1.0).strip() == "1.00x faster"


def test_summary_prints_after_pytest_benchmark_tables(tmp_path):
    shutil.copy(ROOT / "bench" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_noop.py").write_text(TEST_FILE)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    table = out.find("benchmark: 1 tests")
    summary = out.find("GPT-1 engine benchmarks")
    assert table != -1 and summary != -1, out
    assert table < summary, "the summary must come after pytest-benchmark's tables"
    assert "median" in out[summary:]
    assert re.search(r"fused vs eager\s+2\.00x slower", out), out
