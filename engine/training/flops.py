"""One FLOPs-per-token and MFU formula for every report (engine/training/trainer.py's logs, bench/gpu_check.py).

Training FLOPs per token (forward + backward) of a GPT with N parameters, L layers, width C and
context T: 6·N for the matmuls with the parameters (2 per multiply-add forward, 4 backward; the
tied LM head is one of them), plus 6·L·T·C for causal attention — QKᵀ and P·V are 2 matmuls of
2·T·C FLOPs per token, halved by the causal mask (FlashAttention's convention), × 3 with the
backward. MFU = achieved FLOP/s ÷ the device's dense bf16 tensor-core peak.
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (FLOP/s) for MFU, by a substring of the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·n_params + 6·n_layer·seq_len·n_embd (module docstring)."""
    return 6.0 * n_params + 6.0 * n_layer * seq_len * n_embd


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its name (e.g. "NVIDIA H200"), None if unknown."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def mfu(flops_per_tok: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: flops_per_tok · tokens_per_s / peak_flops."""
    return flops_per_tok * tokens_per_s / peak_flops
