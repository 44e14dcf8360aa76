"""loss = mean cross-entropy of softmax(hidden Wᵀ) against targets: tied LM head + loss, chunked.

Spec: engine/reference.py::linear_cross_entropy. hidden (N, C), weight (V, C) (the token
embedding), targets (N,) int64; rows whose target is ignore_index do not count, and the mean is
over the n_valid rows that do (NaN when n_valid = 0, as F.cross_entropy).

The (N, V) logits never exist whole (GPT-1: 16384 × 40478 bf16 would be 1.3 GB, and the
softmax's float32 copy twice that). Rows are processed in chunks of at most CHUNK_BYTES of logits:

    Z = h_chunk Wᵀ                          cuBLAS (torch.mm), compute dtype, fp32 accumulation
    one Triton program per row of Z:        online max / logsumexp over V in BLOCK_V blocks,
                                            loss_i = lse_i - z_i,t; then, in place,
                                            Z ← G = (softmax(z_i) - onehot(t_i)) / n_valid
                                            (zero rows where t_i is ignored)
    grad_h_chunk = G W,  grad_W += Gᵀ h_chunk   cuBLAS; grad_W accumulates in float32

so the gradients of the mean loss come out of the forward (Liger-style) and backward only
scales them by the upstream gradient (engine.ops). d loss / d z_ij = (p_ij - [j = t_i]) / n_valid
for a kept row i, p = softmax(z_i).

Targets outside [0, V) that are not ignore_index are rejected by a host-side check in the
launcher (one device→host sync per call, acceptable next to three large GEMMs per chunk); the
kernel also masks its target-logit read, so such a target could never read out of bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

CHUNK_BYTES = 256 * 2**20  # logits of one chunk at most (GPT-1 bf16: ~3300 rows of 40478)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_V_CUDA = 4096  # vocabulary columns per loop step on the GPU
_BLOCK_V_INTERPRETER = 256  # small, so tests loop over V in several (partial) blocks


@triton.jit
def _cross_entropy_chunk_kernel(
    logits_ptr,  # (rows, V) logits of this chunk; overwritten by ∂loss/∂logits if WRITE_GRAD
    targets_ptr,  # (rows,) int64 targets of this chunk
    loss_ptr,  # (rows,) float32 output: lse - target logit, 0 for ignored rows
    n_valid_ptr,  # () float32: non-ignored targets in the whole batch (the mean's divisor)
    ignore_index,
    # V is constexpr: Triton 3.6's interpreter cannot loop to a runtime bound under numpy >= 2.4
    # (triton-lang/triton#9171); the vocabulary is fixed per model, so one compile.
    V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * V
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
        # pass 2, in place: ∂(mean loss)/∂z_j = (softmax_j - [j = target]) / n_valid, 0 if ignored
        scale = tl.where(valid, 1.0 / tl.maximum(tl.load(n_valid_ptr), 1.0), 0.0)  # n_valid ≥ 1 if valid
        for start in range(0, V, BLOCK_V):
            ok = start + cols < V
            z = tl.load(base + start + cols, mask=ok, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            g = tl.where(start + cols == target, p - 1.0, p) * scale
            tl.store(base + start + cols, g.to(logits_ptr.dtype.element_ty), mask=ok)


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
    """Host check (syncs): every target is ignore_index or a valid class in [0, V)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"linear_cross_entropy: targets must be in [0, {V}) or ignore_index={ignore_index}, "
            f"got targets[{i}] = {int(targets[i])}"
        )


def _add_grad_weight(acc: Tensor, g: Tensor, h: Tensor) -> None:
    """acc (V, C) float32 += gᵀ h, with g, h in the compute dtype."""
    if g.dtype == torch.float32:
        acc.addmm_(g.t(), h)
    elif g.is_cuda:  # cuBLAS writes its fp32 accumulator directly (torch >= 2.8)
        acc.add_(torch.mm(g.t(), h, out_dtype=torch.float32))
    else:  # no fp32-output low-precision mm on CPU: one rounding per chunk, then fp32 sums
        acc.add_(torch.mm(g.t(), h))


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
    _check_targets(targets, V, ignore_index)

    n_valid = (targets != ignore_index).sum().to(torch.float32)  # () on the device: no sync
    losses = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    rows = chunk_rows or _chunk_rows(N, V, hidden.element_size())
    n_chunks = triton.cdiv(N, rows)
    grad_hidden, grad_weight = hidden.new_empty(0), weight.new_empty(0)
    if compute_grad:
        grad_hidden = torch.empty_like(hidden)
        # several chunks accumulate grad_W in float32; one chunk's product is grad_W itself
        grad_weight = torch.zeros(V, C, dtype=torch.float32, device=weight.device) if n_chunks > 1 \
            else torch.zeros_like(weight)
    block_v = min(_BLOCK_V_CUDA if hidden.is_cuda else _BLOCK_V_INTERPRETER, triton.next_power_of_2(V))

    for start in range(0, N, rows):
        end = min(start + rows, N)
        h = hidden[start:end]
        logits = h @ weight.t()  # (rows, V)
        _cross_entropy_chunk_kernel[(end - start,)](
            logits, targets[start:end], losses[start:end], n_valid, ignore_index,
            V=V, WRITE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
        )
        if compute_grad:
            torch.mm(logits, weight, out=grad_hidden[start:end])  # G W: (rows, V) @ (V, C)
            if n_chunks == 1:
                torch.mm(logits.t(), h, out=grad_weight)  # Gᵀ h: (V, rows) @ (rows, C)
            else:
                _add_grad_weight(grad_weight, logits, h)
    loss = losses.sum() / n_valid  # fixed-order sum of the per-row losses
    return loss, grad_hidden, grad_weight.to(weight.dtype)
