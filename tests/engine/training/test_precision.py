"""engine/training/precision.py: --precision {auto,fp32,bf16} resolved per device and CPU, and training
under bf16 autocast on the fused CPU path resuming bit for bit."""

import numpy as np
import pytest
import torch

import engine.training.precision as precision
from engine import GPT1, GPT1Config
from engine.data.windows import RandomWindows
from engine.training.config import TrainConfig
from engine.training.precision import autocast_dtype, cpu_bf16_isa, resolve_precision
from engine.training.trainer import Job, Trainer


@pytest.mark.parametrize(
    "caps,isa",
    [
        ({"amx_bf16": True, "avx512_bf16": True}, "AMX-BF16"),
        ({"amx_bf16": False, "avx512_bf16": True}, "AVX512-BF16"),
        ({"amx_bf16": False, "avx512_bf16": False, "avx512_f": True}, None),
        ({}, None),  # e.g. an ARM CPU: no x86 keys at all
    ],
)
def test_bf16_isa_from_torchs_cpu_capabilities(monkeypatch, caps, isa):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert cpu_bf16_isa() == isa


@pytest.mark.parametrize(
    "flags,isa",
    [
        ("fpu avx512f amx_bf16 amx_tile", "AMX-BF16"),
        ("fpu avx512f avx512_bf16", "AVX512-BF16"),
        ("fpu avx2 avx512f", None),
    ],
)
def test_bf16_isa_from_proc_cpuinfo_without_torchs_capabilities(monkeypatch, tmp_path, flags, isa):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n")
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert cpu_bf16_isa() == isa
    assert precision.cpu_model() == "Test CPU"


@pytest.mark.skipif(not precision.CPUINFO.exists(), reason="no /proc/cpuinfo on this OS")
def test_this_cpu_torch_and_the_kernel_agree():
    flags = set((precision._cpuinfo_field("flags") or "").split())
    expected = "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    assert cpu_bf16_isa() == expected


@pytest.mark.parametrize("isa,dtype", [("AMX-BF16", torch.bfloat16), ("AVX512-BF16", torch.bfloat16), (None, None)])
def test_auto_on_cpu_is_bf16_exactly_where_it_is_native(monkeypatch, isa, dtype):
    monkeypatch.setattr(precision, "cpu_bf16_isa", lambda: isa)
    got, reason = resolve_precision("auto", "cpu")
    assert got == dtype
    assert (isa in reason) if isa else ("neither AMX-BF16 nor AVX512-BF16" in reason and reason.startswith("fp32"))
    assert precision.cpu_model() in reason  # the resolved config names the machine


def test_explicit_choices_and_cuda(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_isa", lambda: None)
    assert resolve_precision("fp32", "cpu")[0] is None
    assert resolve_precision("fp32", "cuda")[0] is None
    dtype, reason = resolve_precision("bf16", "cpu")  # asked for: honoured, with the warning in the reason
    assert dtype == torch.bfloat16 and "emulated" in reason
    assert resolve_precision("auto", "cuda") == (torch.bfloat16, "bf16 autocast on CUDA (auto)")


def test_bad_precision_names_the_value():
    with pytest.raises(ValueError, match=r"precision must be one of auto, fp32, bf16, got 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_trainer_autocast_dtype_follows_resolve_precision(monkeypatch):
    for isa in ("AMX-BF16", None):
        monkeypatch.setattr(precision, "cpu_bf16_isa", lambda isa=isa: isa)
        cfg = TrainConfig(precision="auto")
        assert autocast_dtype(cfg, torch.device("cpu")) == resolve_precision("auto", "cpu")[0]


# ---- resume under bf16 on the fused CPU path ------------------------------------------------

MODEL = dict(
    n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=61, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1
)  # dropout on: the restored RNG state matters
SEQ = 12
TOKENS = np.random.default_rng(0).integers(0, 61, 2000).astype(np.uint16)


def make_trainer(out, resume_from=None, init_seed=0):
    cfg = TrainConfig(
        out=str(out),
        max_steps=5,
        batch_size=4,
        micro_batch_size=2,
        lr=1e-3,
        warmup_steps=1,
        eval_every=0,
        checkpoint_every=0,
        log_every=1,
        precision="bf16",
        device="cpu",
    )
    torch.manual_seed(init_seed)
    model = GPT1(GPT1Config(**MODEL), fused=True)
    windows = RandomWindows(TOKENS, SEQ + 1, cfg.batch_size, cfg.seed)
    loss = lambda m, batch: m(batch[:, :-1], targets=batch[:, 1:]).loss  # noqa: E731
    return Trainer(model, cfg, Job(loss, windows, tokens_per_sample=SEQ), resume_from=resume_from, progress=False)


def test_bf16_fused_resume_is_bit_identical(tmp_path):
    full = make_trainer(tmp_path / "full")
    assert full.autocast == torch.bfloat16
    assert full.fit().status == "finished"
    part = make_trainer(tmp_path / "part")
    result = part.fit(stop_at=2)
    assert result.status == "stopped" and result.step == 2
    torch.manual_seed(1234)  # disturb every RNG before resuming
    np.random.seed(1234)
    resumed = make_trainer(tmp_path / "part", resume_from=result.checkpoint, init_seed=99)
    assert resumed.fit().status == "finished"
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert a[k].dtype == torch.float32, f"{k}: master weights must stay fp32"
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    losses = lambda t: [r["loss"] for r in t.metrics.records if "loss" in r]  # noqa: E731
    assert losses(full) == losses(resumed)
