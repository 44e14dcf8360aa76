"""loss = mean cross-entropy of softmax(hidden Wᵀ) against targets: tied LM head + loss, chunked.

Spec: engine/model/reference.py::linear_cross_entropy. hidden (N, C), weight (V, C) (the token
embedding), targets (N,) int64; rows whose target is ignore_index do not count, and the mean is
over the n_valid rows that do (NaN when n_valid = 0, as F.cross_entropy).

The (N, V) logits never exist whole (GPT-1: 16384 × 40478 bf16 would be 1.3 GB, and the
softmax's float32 copy twice that). Rows are processed in chunks of at most CHUNK_BYTES of logits:

    Z = h_chunk W_padᵀ                      cuBLAS (torch.mm), compute dtype, fp32 accumulation
    one Triton program per row of Z:        online max / logsumexp over the V real columns in
                                            BLOCK_V blocks, loss_i = lse_i - z_i,t; then, in
                                            place, Z ← G = softmax(z_i) - onehot(t_i)
                                            (zero rows where t_i is ignored, zero padding columns)
    grad_h_chunk = (G W_pad) / n_valid      cuBLAS, scaled in fp32 after the GEMM
    acc += Gᵀ h_chunk                       cuBLAS into one float32 (V_pad, C) accumulator
                                            (beta = 1: no per-chunk temporary); grad_W = acc / n_valid

so the gradients of the mean loss come out of the forward (Liger-style) and backward only
scales them by the upstream gradient (engine.ops). d loss / d z_ij = (p_ij - [j = t_i]) / n_valid
for a kept row i, p = softmax(z_i). G is stored unscaled (|G| ≤ 1) and 1/n_valid is applied in
fp32 after the GEMMs: stored already divided by n_valid (~16K rows), fp16's G would underflow.

The low-precision GEMMs with a float32 output need torch's out_dtype (torch >= 2.8, CUDA only),
and accumulating into a float32 acc in place needs a torch from after pytorch#167931 (Nov 2025;
before it CUDA refused "self and mat2 must have the same dtype"). fp32_output probes, once per
device type and dtype, what this torch runs correctly, and the GEMMs take the best of: in place
into acc; through one unrounded float32 (V_pad, C) temporary; the product rounded once per chunk
to the compute dtype (torch < 2.8, and CPU tensors, whose builds have no out_dtype kernels).

The vocabulary is padded inside the op to V_pad = a multiple of PAD (64) with zero rows of W:
V = 40478 ≡ 6 (mod 8) would make the logits' leading dimension misaligned for all three GEMMs,
which takes cuBLAS off its fastest kernels. The kernel reads only the V real columns of a row of
V_pad (row stride LD = V_pad) and writes G = 0 in the padding; the module, its state dict and the
HF files keep V rows.

Targets outside [0, V) that are not ignore_index: for CPU tensors the launcher raises a
ValueError naming the first one (host memory, no sync to speak of); on CUDA there is no host
sync in the training step's forward, so instead such a target makes the loss NaN (a device-side
flag: the train loop skips non-finite steps and stops with an error after max_bad_steps) —
validate token ids where the batch is built for a message naming the token. The kernel masks its
target-logit read, so a bad target can never read out of bounds.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .device import on_tensor_device

CHUNK_BYTES = 256 * 2**20  # logits of one chunk at most (GPT-1 bf16: ~3300 rows of 40512)
PAD = 64  # the padded vocabulary is a multiple of this (16-byte aligned rows in any dtype)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_V_CUDA = 4096  # vocabulary columns per loop step on the GPU
_BLOCK_V_INTERPRETER = 256  # small, so tests loop over V in several (partial) blocks


@triton.jit
def _cross_entropy_chunk_kernel(
    logits_ptr,  # (rows, V) logits of this chunk; overwritten by ∂loss/∂logits if WRITE_GRAD
    targets_ptr,  # (rows,) int64 targets of this chunk
    loss_ptr,  # (rows,) float32 output: lse - target logit, 0 for ignored rows
    ignore_index,
    # V and LD are constexpr: Triton 3.6's interpreter cannot loop to a runtime bound under numpy
    # >= 2.4 (triton-lang/triton#9171); the vocabulary is fixed per model, so one compile.
    V: tl.constexpr,
    LD: tl.constexpr,  # row stride of logits: the padded vocabulary V_pad ≥ V
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * LD
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK_V)

    # pass 1: running max m and Σ exp(z - m), rescaled whenever the max grows
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        z = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    # the target logit (the read is masked, so a bad target can never leave the row)
    target_ok = valid & (target >= 0) & (target < V)
    z_target = tl.load(base + target, mask=target_ok, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))

    if WRITE_GRAD:
        # every thread has read logits[target] before any warp overwrites it with p - 1 below
        tl.debug_barrier()
        # pass 2, in place: n_valid · ∂(mean loss)/∂z_j = softmax_j - [j = target], 0 if ignored
        # or in the padding (the launcher applies 1/n_valid in fp32 after the GEMMs)
        for start in range(0, LD, BLOCK_V):
            real = (start + cols < V) & valid
            z = tl.load(base + start + cols, mask=real, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            g = tl.where(real, tl.where(start + cols == target, p - 1.0, p), 0.0)
            tl.store(base + start + cols, g.to(logits_ptr.dtype.element_ty), mask=start + cols < LD)


def chunk_launch(V: int, cuda: bool) -> dict:
    """The row kernel's launch: padded row stride LD, BLOCK_V columns per step, warps."""
    block_v = min(_BLOCK_V_CUDA if cuda else _BLOCK_V_INTERPRETER, triton.next_power_of_2(V))
    return dict(LD=triton.cdiv(V, PAD) * PAD, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)


def _chunk_rows(N: int, V: int, itemsize: int) -> int:
    """Rows per chunk: as many as CHUNK_BYTES of logits allow, balanced across the chunks."""
    max_rows = max(1, CHUNK_BYTES // (V * itemsize))
    n_chunks = max(1, triton.cdiv(N, max_rows))
    return max(1, triton.cdiv(N, n_chunks))


def _check(hidden: Tensor, weight: Tensor, targets: Tensor) -> None:
    if hidden.dim() != 2 or hidden.shape[1] == 0 or hidden.dtype not in _DTYPES:
        raise ValueError(
            "linear_cross_entropy: hidden must be 2-D (N, C ≥ 1) float32/float16/bfloat16, "
            f"got {hidden.dtype} of shape {tuple(hidden.shape)}"
        )
    C = hidden.shape[1]
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != C or weight.dtype != hidden.dtype \
            or weight.device != hidden.device:
        raise ValueError(
            f"linear_cross_entropy: weight must be (V ≥ 1, {C}) {hidden.dtype} on {hidden.device}, "
            f"got {weight.dtype} of shape {tuple(weight.shape)} on {weight.device}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64 or targets.device != hidden.device:
        raise ValueError(
            f"linear_cross_entropy: targets must be int64 of shape ({hidden.shape[0]},) on {hidden.device}, "
            f"got {targets.dtype} of shape {tuple(targets.shape)} on {targets.device}"
        )


def _check_targets(targets: Tensor, V: int, ignore_index: int) -> None:
    """Host check of CPU targets: every target is ignore_index or a valid class in [0, V)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"linear_cross_entropy: targets must be in [0, {V}) or ignore_index={ignore_index}, "
            f"got targets[{i}] = {int(targets[i])}"
        )


class Fp32Output(NamedTuple):
    """Which float32-output GEMMs on low-precision operands this torch runs on a device."""

    addmm: bool  # torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc), acc float32: in place
    mm: bool  # torch.mm(a, b, out_dtype=torch.float32): the product unrounded, in float32


def _runs(gemm) -> bool:
    """gemm() returns True; False where this torch refuses the call (no such argument, no kernel)."""
    try:
        return bool(gemm())
    except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
        return False


@functools.cache
def fp32_output(device_type: str, dtype: torch.dtype) -> Fp32Output:
    """Probes, on 2×2 tensors of `dtype` on `device_type`, each call and its exact result."""
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype, device=device_type)
    b = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=dtype, device=device_type)
    want = a.float() @ b.float()

    def addmm() -> bool:
        acc = torch.ones(2, 2, dtype=torch.float32, device=device_type)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return torch.equal(acc, want + 1)

    def mm() -> bool:
        out = torch.mm(a, b, out_dtype=torch.float32)
        return out.dtype == torch.float32 and torch.equal(out, want)

    return Fp32Output(addmm=_runs(addmm), mm=_runs(mm))


def _grad_hidden(out: Tensor, g: Tensor, w: Tensor, inv_n: Tensor) -> None:
    """out = (g w) · inv_n, the scale applied in fp32 after the GEMM (g unscaled: no underflow)."""
    if g.dtype != torch.float32 and fp32_output(g.device.type, g.dtype).mm:
        prod = torch.mm(g, w, out_dtype=torch.float32)
    else:  # float32, or no float32-output mm here: the product rounded once to g's dtype
        prod = torch.mm(g, w)
    out.copy_(prod.float().mul_(inv_n))


def _add_grad_weight(acc: Tensor, g: Tensor, h: Tensor) -> None:
    """acc (V_pad, C) float32 += gᵀ h, g and h in the compute dtype, by the best GEMM this torch has
    (module docstring): in place, else through an unrounded temporary, else rounded per chunk."""
    if g.dtype == torch.float32:
        acc.addmm_(g.t(), h)
        return
    can = fp32_output(g.device.type, g.dtype)
    if can.addmm:
        torch.addmm(acc, g.t(), h, out_dtype=torch.float32, out=acc)
    elif can.mm:
        acc.add_(torch.mm(g.t(), h, out_dtype=torch.float32))
    else:
        acc.add_(torch.mm(g.t(), h))


def _pad_rows(weight: Tensor, rows: int) -> Tensor:
    """weight with zero rows appended up to `rows` (the padded vocabulary)."""
    if weight.shape[0] == rows:
        return weight
    padded = weight.new_zeros(rows, weight.shape[1])
    padded[: weight.shape[0]].copy_(weight)
    return padded


@on_tensor_device
def linear_cross_entropy_fwd(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, compute_grad: bool,
    *, chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight): the mean loss (float32 scalar) and, if compute_grad, its
    gradients in hidden's / weight's dtype (else empty tensors). chunk_rows overrides the chunk
    size (tests use it to force many chunks)."""
    _check(hidden, weight, targets)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    (N, C), V = hidden.shape, weight.shape[0]
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    if not hidden.is_cuda:
        _check_targets(targets, V, ignore_index)
    launch = chunk_launch(V, hidden.is_cuda)
    w_pad = _pad_rows(weight, launch["LD"])

    valid = targets != ignore_index
    n_valid = valid.sum().to(torch.float32)  # () on the device: no sync
    inv_n = 1.0 / n_valid.clamp(min=1.0)  # rows are all ignored ⇒ G = 0 and grads 0
    losses = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    rows = chunk_rows or _chunk_rows(N, launch["LD"], hidden.element_size())
    grad_hidden, grad_weight = hidden.new_empty(0), weight.new_empty(0)
    if compute_grad:
        grad_hidden = torch.empty_like(hidden)
        acc = torch.zeros(launch["LD"], C, dtype=torch.float32, device=weight.device)

    for start in range(0, N, rows):
        end = min(start + rows, N)
        h = hidden[start:end]
        logits = h @ w_pad.t()  # (rows, V_pad), leading dimension a multiple of PAD
        _cross_entropy_chunk_kernel[(end - start,)](
            logits, targets[start:end], losses[start:end], ignore_index,
            V=V, WRITE_GRAD=compute_grad, **launch,
        )
        if compute_grad:
            _grad_hidden(grad_hidden[start:end], logits, w_pad, inv_n)  # G W: (rows, V_pad) @ (V_pad, C)
            _add_grad_weight(acc, logits, h)  # Gᵀ h: (V_pad, rows) @ (rows, C)
    if compute_grad:
        grad_weight = acc[:V].mul_(inv_n).to(weight.dtype)
    bad = (valid & ((targets < 0) | (targets >= V))).any()  # device flag (CPU targets raised above)
    loss = torch.where(bad, float("nan"), losses.sum() / n_valid)  # fixed-order sum of the row losses
    return loss, grad_hidden, grad_weight
