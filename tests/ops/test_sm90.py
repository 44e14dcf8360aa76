"""The offline sm_90 gate (no GPU): every Triton kernel × every autotune config it may launch ×
{bf16, fp32} × {dropout, none}, compiled for sm_90a at GPT-1's shapes by bench/sm90_report.py
with Triton's bundled ptxas. Fails on any config that spills, needs more than 227 KiB of shared
memory, or is a bf16 matmul without wgmma. Skipped only where Triton or its bundled
ptxas/cuobjdump is missing. The compiles run once per test run (a module fixture), two at a time,
and are cached by content across runs (bench/sm90_report.py: _cache_key), so a rerun without
kernel changes takes seconds."""

from __future__ import annotations

import pytest

from bench import sm90_report as R

pytestmark = pytest.mark.offline


@pytest.fixture(scope="module")
def results() -> list[R.Result]:
    why = R.tools_missing()
    if why:
        pytest.skip(why)
    return R.run()


def test_every_config_compiles_clean(results):
    bad = [f"{r.job.label}: {'; '.join(r.failures())}" for r in results if r.failures()]
    assert not bad, f"{len(bad)} of {len(results)} sm_90 compiles fail the gate:\n" + "\n".join(bad)


def test_every_kernel_and_variant_is_compiled(results):
    """The report covers each op's kernels in both dtypes, and attention also with dropout: a gate
    that compiled nothing could not fail."""
    seen = {(r.job.op, r.job.attr, r.job.dtype, r.job.dropout) for r in results}
    for op, attr in [("attention", a) for a in {r.job.attr for r in results if r.job.op == "attention"}] + [
        ("linear_gelu", "_matmul_autotuned"),
        ("linear_cross_entropy", "_cross_entropy_chunk_kernel"),
        ("add_layernorm", "_add_layernorm_bwd_kernel"),
    ]:
        for dtype in R.DTYPES:
            assert (op, attr, dtype, False) in seen or (op, attr, dtype, True) in seen, (
                f"{op}/{attr} {dtype} not compiled"
            )
    assert sum(r.is_matmul and r.job.dtype == "bf16" for r in results) >= 4, "bf16 matmuls missing from the report"


def test_add_layernorm_backward_fits_two_ctas_per_sm(results):
    """65536 registers per SM: registers × threads of one CTA must leave room for a second."""
    for r in results:
        if r.job.attr == "_add_layernorm_bwd_kernel":
            per_cta = r.regs * 32 * r.job.num_warps
            assert 2 * per_cta <= 65536, f"{r.job.label}: {r.regs} registers × {32 * r.job.num_warps} threads"


def test_add_layernorm_dropout_spends_one_philox_call_per_8_elements(results):
    """32-bit integer multiplies in the PTX: a Philox4x32-7 call has 4 per round and serves 8
    elements, so 3.5 per element (plus addressing); one 10-round call per element would need 40."""
    for r in results:
        if r.job.op == "add_layernorm" and r.job.dropout:
            c = r.job.constexprs
            per_thread = c["ROWS"] * (c["BLOCK_C"] + c["TAIL"]) // (32 * r.job.num_warps)
            assert r.imuls <= 4 * 7 * per_thread // 8 + 8, f"{r.job.label}: {r.imuls} multiplies, {per_thread} elements"


def test_attention_dropout_adds_at_most_one_conversion_per_loop(results):
    """Every attention config and dtype: dropout adds at most one shared-memory conversion per
    inner-loop iteration (dK/dV's transposed tiles and fp32's non-wgmma layouts move one packed
    keep word per Philox call; bf16 fwd and dQ move nothing): at most two more bar.sync, one in
    bf16 where the loop's own barrier serves the other. The old mask transposition cost 9 more."""
    plain = {
        (r.job.attr, r.job.config, r.job.dtype): r for r in results if r.job.op == "attention" and not r.job.dropout
    }
    pairs = [
        (plain[(r.job.attr, r.job.config, r.job.dtype)], r)
        for r in results
        if r.job.op == "attention" and r.job.dropout and (r.job.attr, r.job.config, r.job.dtype) in plain
    ]
    assert len(pairs) >= 10, f"only {len(pairs)} attention configs compiled with and without dropout"
    for off, on in pairs:
        assert len(on.bars) == len(off.bars), on.job.label
        for b_off, b_on in zip(off.bars, on.bars):
            assert b_on <= b_off + (1 if on.job.dtype == "bf16" else 2), (
                f"{on.job.label}: bar.sync per iteration {off.bars} -> {on.bars}"
            )


def test_the_gate_flags_each_failure_kind():
    """Result.failures, the gate's rule, on synthetic results: each fault is caught."""
    job = R.Job("op", "m", "k", "bf16", False, {}, {}, 4)
    assert R.Result(job, spill=8).failures() == ["spills 8 B"]
    assert R.Result(job, smem=R.SMEM_LIMIT + 1).failures()[0].startswith("shared memory")
    assert R.Result(job, is_matmul=True, wgmma=0).failures() == ["bf16 matmul without wgmma"]
    assert R.Result(job, error="RuntimeError: boom").failures()[0].startswith("compile error")
    assert R.Result(job, is_matmul=True, wgmma=4).failures() == []


def test_sass_loops_are_counted_between_a_backward_branch_and_its_target():
    sass = "\n".join(
        [
            "        /*0000*/                   MOV R1, R2 ;",
            "        /*0010*/                   IADD3 R1, R1, 1, RZ ;",
            "        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;",
            "        /*0030*/              @P0 BRA 0x10 ;",
            "        /*0040*/                   EXIT ;",
            "        /*0050*/                   BRA 0x50;",
        ]
    )
    assert R._sass_loops(sass) == ([3], [1])
