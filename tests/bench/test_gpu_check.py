"""bench/gpu_check.py's parts that can break before a GPU sees them: the CUDA test suite's
command (it must find the tests) and --only (rerunning one part on the GPU)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_cuda_test_suite_command_collects_the_kernel_tests(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--smoke", "--only", "tests", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    results = json.loads(out.read_text())
    assert results["checks"] == {"CUDA test suite collects": {"ok": True, "rc": 0}}, results["tests"]["tail"]
    collected = re.search(r"(\d+) tests collected", results["tests"]["tail"])
    assert collected and int(collected.group(1)) > 100, results["tests"]["tail"]
    assert proc.returncode == 0 and list(results["timings"]) == [], proc.stdout[-2000:]
