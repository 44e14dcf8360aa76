"""bench/gpu_check.py's orchestration, on CPU through --smoke (tiny shapes, the Triton
interpreter): every part runs in its own process and writes its own file under --out; a part that
crashes or outlives its budget loses only its own rest. The GPU runs the same parts, the same code
and writes the same files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import PARTS, Recorder, part_file, read_records
from bench.gpu_tests import outcomes

ROOT = Path(__file__).resolve().parents[2]


def documented_command() -> list[str]:
    """The first GPU call as the docs give it (docs/kernels.md, "The first GPU call"; the README names it)."""
    section = (ROOT / "docs" / "kernels.md").read_text().split("## The first GPU call", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0].split()


def test_the_documented_gpu_command_is_the_one_tested():
    command = documented_command()
    assert command == ["python3", "bench/gpu_check.py"], command  # the smoke run below adds only --smoke etc.
    assert " ".join(command) in (ROOT / "README.md").read_text()


def kinds(records: list[dict]) -> list[str]:
    return [r["type"] for r in records]


def test_smoke_runs_every_part_in_its_own_process_and_a_fault_costs_only_its_part(tmp_path):
    """One --smoke run of every part, with model aborting after its first result (as a segfault or
    a CUDA abort would) and ffn hanging past its budget: each part wrote its own file, the two
    kept what they wrote and say how they ended, every other part is whole and passed, results
    were printed as they came and the summary table last."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)  # --out, not a lease's $OUT
    cmd = [sys.executable, *documented_command()[1:], "--smoke", "--out", str(tmp_path)]
    cmd += ["--fault", "model=crash", "ffn=hang", "--budget", "ffn=20"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(part_file(tmp_path, p).name for p in PARTS)
    records = {part: read_records(part_file(tmp_path, part)) for part in PARTS}
    assert len({r[0]["pid"] for r in records.values()}) == len(PARTS)  # one process each
    for part, first, how in (("model", "check", "crashed: SIGABRT"), ("ffn", "timing", "timeout: killed at its")):
        assert kinds(records[part]) == ["header", first, "ended"], records[part]
        assert records[part][-1]["how"].startswith(how), records[part]
    for part in set(PARTS) - {"model", "ffn"}:
        assert kinds(records[part])[0] == "header" and kinds(records[part])[-1] == "end", (part, records[part])
        bad = [r for r in records[part] if r["type"] == "error" or (r["type"] == "check" and not r["ok"])]
        assert not bad, (part, bad)
    checks = {part: [r["name"] for r in rs if r["type"] == "check"] for part, rs in records.items()}
    assert "attention mask == NumPy spec (bit for bit)" in checks["dropout"]
    assert "linear_cross_entropy 4 chunks vs 1: grad_weight" in checks["ops"]
    tests = {r["name"]: r for r in records["tests"] if r["type"] == "check"}
    assert tests["pytest gpu_first collects"]["collected"] > 50 and tests["pytest the rest collects"]["collected"] > 100
    timed = {(r["group"], r["name"]) for rs in records.values() for r in rs if r["type"] == "timing"}
    assert {("attention", "fused p=0.1"), ("attention", "sdpa p=0.1"), ("step", "fused"), ("step", "eager")} <= timed
    lines = proc.stdout.splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("== gpu_check summary"))
    assert any(line.startswith("[ops] ok   attention out") for line in lines[:summary])
    table = {line.split()[0]: line.split()[1] for line in lines[summary + 2 : summary + 2 + len(PARTS)]}
    assert table == {**dict.fromkeys(PARTS, "ok"), "model": "crashed", "ffn": "timeout"}


def test_the_summary_reads_what_a_killed_run_left(tmp_path, capsys):
    """--summary DIR: a part cut off mid-line (a kill while writing) loses that line only; exit 0 only
    when every part ended with every check ok."""
    rec = Recorder(tmp_path, "ops")
    rec.header(device="GPU", torch="2.11", triton="3.6.0")
    rec.check("attention out", True, err=1e-3)
    rec.end(wall_s=3.0)
    assert gpu_check.main(["--summary", str(tmp_path)]) == 1  # the other parts did not run
    assert gpu_check.print_summary(tmp_path, ["ops"]) == 0
    with part_file(tmp_path, "dropout").open("w") as f:
        f.write('{"type": "header", "part": "dropout"}\n{"type": "check", "name": "mask", "ok": fal')
    assert [r["type"] for r in read_records(part_file(tmp_path, "dropout"))] == ["header"]
    assert gpu_check.print_summary(tmp_path, ["ops", "dropout"]) == 1
    table = capsys.readouterr().out
    assert "ops        ok" in table and "dropout    incomplete" in table


def test_out_defaults_to_the_leases_out_folder(monkeypatch):
    monkeypatch.setenv("OUT", "/lease/out")
    assert gpu_check.default_out() == Path("/lease/out")
    monkeypatch.delenv("OUT")
    assert gpu_check.default_out() == ROOT / "bench" / "results"


@pytest.mark.parametrize("argv", [["--budget", "tests"], ["--budget", "nope=3"], ["--fault", "ops=explode"]])
def test_bad_options_get_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("gpu_check.py: error: --")


def test_failing_tests_are_named_from_pytest_lines_also_when_cut_off():
    log = "\n".join(
        [
            "tests/ops/test_a.py::test_x[triton-(1, 16, 13)] PASSED                [  1%]",
            "tests/ops/test_a.py::test_y[cpp] FAILED [  2%]",
            "[gw0] [ 10%] PASSED tests/ops/test_b.py::test_z[triton-(2, 7)]",
            "[gw1] [ 11%] ERROR tests/ops/test_b.py::test_w",
            "FAILED tests/ops/test_a.py::test_y[cpp] - AssertionError: boom",
            "[gw1] [ 12%] FAIL",  # the line a kill cut short
        ]
    )
    assert outcomes(log) == {
        "tests/ops/test_a.py::test_x[triton-(1, 16, 13)]": "PASSED",
        "tests/ops/test_a.py::test_y[cpp]": "FAILED",
        "tests/ops/test_b.py::test_z[triton-(2, 7)]": "PASSED",
        "tests/ops/test_b.py::test_w": "ERROR",
    }


def test_a_cuda_error_stops_its_part_and_other_errors_do_not(tmp_path):
    """An exception in one section is recorded and the part goes on; a CUDA error (sticky: every
    later CUDA call fails too) is recorded and ends the part with CUDA_FAULT_EXIT."""
    from bench.gpu_parts import Part

    part = Part(Recorder(tmp_path, "ops"), smoke=False, budget=0)
    part.section("one", lambda: [][1])
    part.section("two", lambda: part.rec.check("still runs", True))

    def illegal_address():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(SystemExit) as exit_:
        part.section("three", illegal_address)
    assert exit_.value.code == gpu_check.CUDA_FAULT_EXIT
    records = read_records(part_file(tmp_path, "ops"))
    assert [(r["type"], r["name"]) for r in records] == [
        ("error", "one"),
        ("check", "still runs"),
        ("error", "three"),
        ("error", "part"),
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real run is bench/gpu_check.py's job on a GPU")
def test_without_a_gpu_the_real_run_stops_with_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "gpu_check.py: error: torch sees no CUDA device here; --smoke runs the parts on the CPU"
    )
