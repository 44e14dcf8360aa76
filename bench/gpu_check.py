"""The first GPU call: every fused op and a GPT-1 step checked against the reference, then timed,
then the GPU's test suite; built for a lease of one command of at most 10 minutes whose only
output is what it writes under $OUT.

    python3 bench/gpu_check.py                          # the GPU machine: all parts, files under $OUT
    python3 bench/gpu_check.py --only attention tests   # rerun parts (--budget tests=300: more time)
    python3 bench/gpu_check.py --summary DIR            # the table of a finished or killed run's files
    python3 bench/gpu_check.py --smoke --out DIR        # CPU, Triton interpreter, tiny shapes (CI)

Each part (PARTS, in this order: correctness before timing, the test suite last) runs in its own
subprocess with its own time budget and appends its results, one JSON object per line as each is
known, to DIR/gpu-check-<part>.jsonl: a crash, a sticky CUDA error or a kill at the budget costs
only the rest of that part (the orchestrator notes how it ended), and DIR never holds more than
the 8 part files. Every result prints its line as it is known; the summary table comes last.
DIR is --out, else $OUT, else bench/results/. No install is needed: a plain checkout and python3
(the C++ CPU kernels are not built: the GPU runs Triton).

The budgets (BUDGETS, 475 s in all: within 8 minutes) are estimates, not measurements, as no GPU
has run this yet: compiles dominate the first parts (the ops part compiles and tunes every
attention config at the timing shape, ~35 Triton compiles of a few seconds each on one core;
Triton's cache and TRITON_CACHE_AUTOTUNING=1 hand them to the later parts), torch.compile of the
117M reference (~1 minute) the step, and the kernels' test suite gets the rest, its GPU-relevant
tests first (bench/gpu_tests.py). What each part checks: bench/gpu_parts.py.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = {  # part → seconds it may run (a kill at the budget keeps what it wrote)
    "ops": 150,  # preflight + each op vs the fp32 reference at GPT-1's shapes (compiles, autotunes)
    "dropout": 25,  # masks vs the NumPy spec, fused dropout vs the reference fed the kernel's mask
    "model": 35,  # a GPT-1 (117M) training step, fused bf16 vs reference fp32
    "attention": 40,  # TFLOP/s vs SDPA, with and without dropout
    "layernorm": 15,  # GB/s vs eager and a device copy
    "ffn": 30,  # the FFN's first projection: both candidates vs the matmul alone
    "step": 80,  # tokens/s, MFU and peak memory: fused, eager, torch.compile
    "tests": 100,  # pytest tests/ops on the GPU (bench/gpu_tests.py)
}
PARTS = tuple(BUDGETS)
SMOKE_BUDGET_S = 300  # --smoke: any part (the interpreter's speed depends on the machine's load)
FAULTS = ("crash", "hang")  # --fault: what tests/bench/test_gpu_check.py injects into one part
CUDA_FAULT_EXIT = 3  # a part's exit status after a CUDA error (every later CUDA call would fail too)
NO_GPU_EXIT = 4  # a part's exit status where torch sees no CUDA device: nothing else is tried


def part_file(out: Path, part: str) -> Path:
    return out / f"gpu-check-{part}.jsonl"


class Recorder:
    """One part's results: each record is one JSON line appended to the part's file when it is
    known (a crash or a kill keeps every line before it) and one printed line. `fault`: after the
    first record, abort (crash) or sleep past any budget (hang); the orchestration's tests use it."""

    def __init__(self, out: Path, part: str, fault: str | None = None):
        self.path, self.part, self.fault, self.count = part_file(out, part), part, fault, 0

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        self.count += 1
        if self.fault == "crash" and self.count == 2:  # the header, then one result
            os.abort()
        if self.fault == "hang" and self.count == 2:
            time.sleep(10**6)

    def say(self, text: str) -> None:
        print(f"[{self.part}] {text}", flush=True)

    def header(self, **fields) -> None:
        self.write(dict(type="header", part=self.part, **fields))

    def check(self, name: str, ok: bool, **fields) -> bool:
        self.write(dict(type="check", name=name, ok=bool(ok), **fields))
        self.say(f"{'ok  ' if ok else 'FAIL'} {name}  {_cells(fields)}")
        return bool(ok)

    def timing(self, group: str, name: str, **fields) -> None:
        self.write(dict(type="timing", group=group, name=name, **fields))
        self.say(f"time {group} | {name}  {_cells(fields)}")

    def info(self, name: str, value) -> None:
        self.write(dict(type="info", name=name, value=value))
        self.say(f"info {name}: {value}")

    def error(self, name: str, error: str) -> None:
        self.write(dict(type="error", name=name, error=error))
        self.say(f"ERROR {name}: {error.splitlines()[0][:300] if error else ''}")

    def end(self, **fields) -> None:
        self.write(dict(type="end", **fields))


def _cells(fields: dict) -> str:
    """k=v for the printed line (empty lists and dicts left out: the file has them)."""
    shown = {k: v for k, v in fields.items() if v != [] and v != {}}
    return "  ".join(f"{k}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in shown.items())


def read_records(path: Path) -> list[dict]:
    """The records of a part file; a line cut short by a kill is dropped."""
    records = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


# ---- the orchestrator --------------------------------------------------------------------


def _part_env(smoke: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if smoke:  # the Triton launchers serve CPU tensors through the interpreter
        env.update(TRITON_INTERPRET="1", GPT1_CPU_KERNELS="triton")
    else:
        env.pop("TRITON_INTERPRET", None)
        env.pop("GPT1_CPU_KERNELS", None)
        env.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # a config tuned by one part is reused by the next
    return env


def _echo_stderr(stream, tail: collections.deque) -> None:
    for line in stream:
        sys.stderr.write(line)
        tail.append(line.rstrip("\n"))


NO_GPU = "failed: no CUDA device"


def run_part(part: str, budget: float, out: Path, smoke: bool, fault: str | None) -> str:
    """Runs one part in its own process group; returns how it ended, also appended to its file
    when it did not end by itself: finished, failed (rc), crashed (signal), timeout."""
    part_file(out, part).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.gpu_parts", part, "--out", str(out), "--budget", str(budget)]
    cmd += ["--smoke"] * smoke + (["--fault", fault] if fault else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_part_env(smoke), stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True
    )
    tail: collections.deque = collections.deque(maxlen=30)
    reader = threading.Thread(target=_echo_stderr, args=(proc.stderr, tail), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part and whatever it started (pytest workers)
        proc.wait()
        rc = None
    reader.join(timeout=5)
    wall = time.perf_counter() - t0
    if rc == 0:
        return "finished"
    if rc is None:
        how = f"timeout: killed at its budget of {budget:.0f} s"
    elif rc < 0:
        how = f"crashed: {signal.Signals(-rc).name}"
    elif rc == NO_GPU_EXIT:
        how = NO_GPU
    elif rc == CUDA_FAULT_EXIT:
        how = "stopped: a CUDA error poisoned the process (the part's file says where)"
    else:
        how = f"failed: exit status {rc}"
    Recorder(out, part).write(dict(type="ended", how=how, wall_s=wall, stderr_tail=list(tail)))
    print(f"[{part}] {how} after {wall:.0f} s", flush=True)
    return how


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, help="results folder (default: $OUT when set, else bench/results/)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    p.add_argument("--only", nargs="+", choices=PARTS, metavar="PART", help=f"run only these: {', '.join(PARTS)}")
    p.add_argument("--budget", nargs="+", default=[], metavar="PART=SECONDS", help="override a part's time budget")
    p.add_argument("--summary", type=Path, metavar="DIR", help="print the table of DIR's part files; run nothing")
    p.add_argument(
        "--fault", nargs="+", default=[], metavar="PART=KIND", help=f"(tests) {FAULTS} after PART's first result"
    )
    args = p.parse_args(argv)
    args.budgets = dict.fromkeys(PARTS, SMOKE_BUDGET_S) if args.smoke else dict(BUDGETS)
    for item in args.budget:
        part, _, seconds = item.partition("=")
        if part not in BUDGETS or not seconds.replace(".", "", 1).isdigit():
            p.error(f"--budget takes PART=SECONDS with PART in {', '.join(PARTS)}, got {item!r}")
        args.budgets[part] = float(seconds)
    args.faults = {}
    for item in args.fault:
        part, _, kind = item.partition("=")
        if part not in BUDGETS or kind not in FAULTS:
            p.error(f"--fault takes PART=KIND with KIND in {FAULTS}, got {item!r}")
        args.faults[part] = kind
    return args


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.summary:
        return print_summary(args.summary)
    out = (args.out or default_out()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    parts = [p for p in PARTS if not args.only or p in args.only]
    start = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    budget = sum(args.budgets[p] for p in parts)
    print(f"gpu_check {start}: {', '.join(parts)} → {out} ({budget:.0f} s budget)", flush=True)
    for part in parts:
        if run_part(part, args.budgets[part], out, args.smoke, args.faults.get(part)) == NO_GPU:
            print(
                "gpu_check.py: error: torch sees no CUDA device here; --smoke runs the parts on the CPU",
                file=sys.stderr,
            )
            return 2
    return print_summary(out, parts)


# ---- the summary -------------------------------------------------------------------------


def _status(records: list[dict]) -> str:
    ended = [r["how"] for r in records if r["type"] == "ended"]
    if ended:
        return ended[-1].split(":")[0]
    if not records:
        return "not run"
    if not any(r["type"] == "end" for r in records):
        return "incomplete"
    bad = any(r["type"] == "error" or (r["type"] == "check" and not r["ok"]) for r in records)
    return "FAILED" if bad else "ok"


def _key_numbers(by_part: dict[str, list[dict]]) -> list[str]:
    """The numbers the first GPU call is for: attention TFLOP/s vs SDPA, the step's MFU and memory."""
    lines = []
    timings = {(r["group"], r["name"]): r for rs in by_part.values() for r in rs if r["type"] == "timing"}
    for p in ("p=0", "p=0.1"):
        fused, sdpa = timings.get(("attention", f"fused {p}")), timings.get(("attention", f"sdpa {p}"))
        if fused and sdpa:
            lines.append(
                f"attention fwd+bwd {p} {fused.get('shape', '')}: fused {fused['fwd_bwd_tflops']:.1f} TFLOP/s, "
                f"SDPA {sdpa['fwd_bwd_tflops']:.1f} ({fused['fwd_bwd_tflops'] / sdpa['fwd_bwd_tflops']:.2f}x)"
            )
    for provider in ("fused", "eager", "compile"):
        row = timings.get(("step", provider))
        if row:
            lines.append(
                f"GPT-1 step {provider} {row.get('shape', '')}: {row['tokens_per_s']:,.0f} tokens/s, "
                f"MFU {100 * row['mfu']:.1f}%, peak {row['peak_gib']:.2f} GiB"
            )
    for r in by_part.get("tests", []):
        if r["type"] == "check" and "counts" in r:
            failing = f", failing: {', '.join(r['failing'])}" if r["failing"] else ""
            lines.append(f"{r['name']} ({r['ended']}): {r['counts']}{failing}")
    return lines


def print_summary(out: Path, parts: list[str] | tuple = PARTS) -> int:
    """The compact table of `out`'s part files; 0 when every part finished with every check ok."""
    by_part = {p: read_records(part_file(out, p)) for p in parts}
    head = next((r for rs in by_part.values() for r in rs if r["type"] == "header"), {})
    print(
        f"\n== gpu_check summary: {head.get('device', '?')} · torch {head.get('torch', '?')} · "
        f"triton {head.get('triton', '?')} · {out}"
    )
    print(f"{'part':<10} {'status':<10} {'checks':>7} {'wall':>6}  failed")
    all_ok = True
    for part, records in by_part.items():
        checks = [r for r in records if r["type"] == "check"]
        failed = [r["name"] for r in checks if not r["ok"]] + [
            f"error in {r['name']}" for r in records if r["type"] == "error"
        ]
        ended = [r for r in records if r["type"] in ("end", "ended")]
        wall = f"{ended[-1]['wall_s']:.0f} s" if ended and "wall_s" in ended[-1] else "-"
        status = _status(records)
        all_ok &= status == "ok"
        passed = f"{sum(r['ok'] for r in checks)}/{len(checks)}" if checks else "-"
        print(f"{part:<10} {status:<10} {passed:>7} {wall:>6}  {'; '.join(failed)[:300]}")
    for line in _key_numbers(by_part):
        print(f"  {line}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
