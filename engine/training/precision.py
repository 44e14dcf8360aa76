"""Which precision a run computes in: `--precision {auto,fp32,bf16}` resolved for a device.

``auto`` means bf16 autocast where bf16 matmuls are native: on CUDA, and on CPUs with
AMX-BF16 (Intel Sapphire Rapids and later) or AVX512-BF16 (e.g. AMD Zen 4, Intel Cooper
Lake). Elsewhere bf16 GEMMs are emulated in fp32 units and run slower than fp32, so ``auto``
keeps fp32 there. Under bf16 autocast the weights stay fp32 (master weights); matmuls run in
bf16 with fp32 accumulation, softmax, LayerNorm statistics and the loss in fp32.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from engine.training.config import TrainConfig

PRECISIONS = ("auto", "fp32", "bf16")
CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str) -> str | None:
    """The first value of `name` in /proc/cpuinfo (Linux), or None."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_model() -> str:
    """The CPU's model name, as lscpu prints it (falls back to platform.processor())."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_bf16_isa() -> str | None:
    """ "AMX-BF16" or "AVX512-BF16" when this CPU has native bf16 matmuls, else None.

    Asks torch (cpuinfo, what oneDNN itself sees) where it can, else the kernel's CPU flags."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.10
    if get_capabilities is not None:
        caps = get_capabilities()
        flags = {name for name in ("amx_bf16", "avx512_bf16") if caps.get(name)}
    else:
        flags = set((_cpuinfo_field("flags") or "").split())
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


def resolve_precision(precision: str, device: torch.device | str) -> tuple[torch.dtype | None, str]:
    """(autocast dtype, or None for fp32; a one-line reason) for `precision` on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp32":
        return None, "fp32 (asked for)"
    if device.type == "cuda":
        return torch.bfloat16, f"bf16 autocast on CUDA ({'auto' if precision == 'auto' else 'asked for'})"
    if device.type != "cpu":
        if precision == "bf16":
            return torch.bfloat16, f"bf16 autocast on {device.type} (asked for)"
        return None, f"fp32 (auto: no bf16 policy for {device.type})"
    isa = cpu_bf16_isa()
    model = cpu_model()
    if precision == "bf16":
        if isa is None:
            return torch.bfloat16, (
                f"bf16 autocast (asked for; {model} has neither AMX-BF16 nor AVX512-BF16: "
                "bf16 matmuls are emulated and slower than fp32)"
            )
        return torch.bfloat16, f"bf16 autocast (asked for; {model} has {isa})"
    if isa is None:
        return None, f"fp32 (auto: {model} has neither AMX-BF16 nor AVX512-BF16)"
    return torch.bfloat16, f"bf16 autocast (auto: {model} has {isa})"


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of cfg.precision on `device` (None: fp32); engine.training.precision says why."""
    from engine.training.precision import resolve_precision

    return resolve_precision(cfg.precision, device)[0]
