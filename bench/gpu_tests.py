"""bench/gpu_check.py's `tests` part: the kernels' test suite (tests/ops) on the GPU, under a cap.

Two pytest runs, in this order, sharing the part's budget: first the tests marked gpu_first (what a
GPU can get wrong and the interpreter cannot show: the bit-exact Philox draws against the NumPy
spec, the packed keep bits, every autotune config against the reference, the dropout masks, the
GPU's launch constants), then the rest. Left out on the GPU: tests marked offline (the sm_90
compile gate and layout probes: compiles without a GPU, which CI runs) and cpp (the C++ CPU
kernels, which CI tests; so csrc/ is never built here). pytest-xdist spreads each run over workers
where it is installed. Every test's outcome line is streamed to a log and parsed, so the failing
tests are named even when the cap kills a run. --smoke only collects both selections.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = "tests/ops"
ON_THE_GPU = "not offline and not cpp"
RUNS = (("pytest gpu_first", f"gpu_first and {ON_THE_GPU}"), ("pytest the rest", f"not gpu_first and {ON_THE_GPU}"))
MARGIN_S = 10  # of the part's budget, kept for writing the results after a capped run
_OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
# pytest -v's result lines: "tests/x.py::t[a, b] PASSED [ 4%]", or under xdist "[gw1] [ 4%] PASSED tests/x.py::t[a, b]"
PLAIN = re.compile(rf"^(tests/\S+\.py::.+?) ({_OUTCOMES})(?:\s+\[\s*\d+%\])?\s*$")
XDIST = re.compile(rf"^\[gw\d+\] \[\s*\d+%\] ({_OUTCOMES}) (tests/\S+\.py::.+?)\s*$")


def outcomes(log: str) -> dict[str, str]:
    """node id → outcome, from pytest -v's result lines (a capped run has the ones that finished)."""
    found = {}
    for line in log.splitlines():
        if m := PLAIN.match(line):
            found[m.group(1)] = m.group(2)
        elif m := XDIST.match(line):
            found[m.group(2)] = m.group(1)
    return found


def _pytest(marker: str, collect_only: bool, workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", TESTS, "-m", marker, "-p", "no:cacheprovider", "-rfE"]
    if collect_only:
        return cmd + ["--collect-only", "-q"]
    return cmd + ["-v"] + (["-n", str(workers)] if workers > 1 else [])


def _run(cmd: list[str], cap: float) -> tuple[int | None, str, float]:
    """cmd in its own process group with output to a log file; (exit status or None if capped, log, s)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPT1_CPU_KERNELS")}
    if "--collect-only" in cmd:  # --smoke: collection only, on the CPU
        env["TRITON_INTERPRET"] = "1"
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+", errors="replace") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(cap, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        log.seek(0)
        return rc, log.read(), time.perf_counter() - t0


def part_tests(part) -> None:
    """The two runs (bench/gpu_parts.Part `part`), each recorded as it ends, failing tests by name."""
    workers = min(8, (os.cpu_count() or 2) // 2) if importlib.util.find_spec("xdist") else 1
    part.rec.info("pytest workers", f"{workers} (pytest-xdist)" if workers > 1 else "1 (no pytest-xdist)")
    part.rec.info("left out on the GPU", "tests marked offline (CI compiles for sm_90a) and cpp (csrc/ is not built)")
    deadline = time.perf_counter() + (part.budget or 600) - MARGIN_S
    for name, marker in RUNS:
        cap = deadline - time.perf_counter()
        if cap < 5:
            part.rec.check(name, False, marker=marker, ended="not run: the part's budget is spent")
            continue
        rc, log, wall = _run(_pytest(marker, part.smoke, workers), cap)
        tail = log.splitlines()[-25:]
        if part.smoke:
            collected = re.search(r"(\d+)(?:/\d+)? tests? collected", log)
            n = int(collected.group(1)) if collected else 0
            part.rec.check(
                f"{name} collects", rc == 0 and n > 0, collected=n, marker=marker, wall_s=wall, tail=tail if rc else []
            )
            continue
        found = outcomes(log)
        counts = dict(Counter(found.values()))
        failing = sorted(node for node, outcome in found.items() if outcome in ("FAILED", "ERROR"))
        ended = "capped: killed at the part's budget" if rc is None else f"exit status {rc}"
        ok = rc == 0 and not failing
        part.rec.check(
            name, ok, marker=marker, ended=ended, wall_s=wall, counts=counts, failing=failing, tail=[] if ok else tail
        )
