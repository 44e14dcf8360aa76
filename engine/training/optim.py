"""The optimiser and the learning-rate schedule: AdamW over two parameter groups (decay on matrices
and embeddings only), warm-up then cosine/linear decay, and OpenAI's Adam, as GPT-1 was trained
with it (openai/finetune-transformer-lm, opt.py).

It is not torch's AdamW. At update t (1-based), with the learning rate lr_t = lr · schedule(t)
that the trainer writes into each parameter group before the update:

    m = β1·m + (1−β1)·g                 v = β2·v + (1−β2)·g²
    α = lr_t · √(1−β2ᵗ) / (1−β1ᵗ)       (the bias correction folded into the step size)
    p = p − α · ( m / (√v + ε) + λ·p )   (λ·p only for matrices: ndim ≥ 2)

Differences from torch.optim.AdamW: ε is added to the *uncorrected* √v (AdamW: to √v̂), and
the decoupled decay λ·p is scaled by α, bias correction included (AdamW: by lr_t alone).
Vectors (biases, LayerNorm gains) get no decay whatever their group says, as OpenAI's
``vector_l2=False``. Gradient clipping is the trainer's, as it is for AdamW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from engine.training.config import TrainConfig


class OpenAIAdam(torch.optim.Optimizer):
    """OpenAI's Adam (see the module doc). ``weight_decay`` is OpenAI's ``l2`` (GPT-1: 0.01)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2.5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict[str, Any], params: list[Tensor]) -> None:
        by_step: dict[float, list[Tensor]] = {}
        for p in params:
            if p.grad.is_sparse:
                raise ValueError("OpenAIAdam does not take sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float64)  # a tensor, saved and loaded like AdamW's
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            by_step.setdefault(float(state["step"]), []).append(p)
        for t, ps in by_step.items():  # one bucket unless some parameter skipped updates
            self._update_bucket(group, ps, t)

    def _update_bucket(self, group: dict[str, Any], params: list[Tensor], t: float) -> None:
        b1, b2 = group["betas"]
        ms = [self.state[p]["exp_avg"] for p in params]
        vs = [self.state[p]["exp_avg_sq"] for p in params]
        grads = [p.grad for p in params]
        alpha = group["lr"] * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        torch._foreach_lerp_(ms, grads, 1.0 - b1)  # m = β1·m + (1−β1)·g
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)  # v = β2·v + (1−β2)·g²
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, group["eps"])  # ε on the uncorrected √v
        updates = torch._foreach_div(ms, denom)
        if group["weight_decay"]:
            for u, p in zip(updates, params):
                if p.ndim >= 2:  # OpenAI: matrices only (vector_l2=False)
                    u.add_(p, alpha=group["weight_decay"])
        torch._foreach_add_(params, updates, alpha=-alpha)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: weight matrices and embeddings (ndim >= 2) decay, biases and
    LayerNorm gains (ndim < 2) do not. Each group lists its parameter names in "names"."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # shared (tied) parameters appear once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, world_size: int = 1) -> torch.optim.Optimizer:
    """cfg.optimizer over `param_groups`: AdamW (torch's fused implementation where the device
    has it — CUDA, and CPU since torch 2.4 — else foreach), or OpenAI's Adam (engine.training.optim).
    cfg.zero1 on several processes: the same optimizer under ZeRO-1 (`zero1`)."""
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    device = params[0].device.type if params else "cpu"
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.zero1 and world_size > 1:
        return zero1(groups, cfg.optimizer, kwargs)
    if cfg.optimizer == "openai-adam":
        return OpenAIAdam(groups, **kwargs)
    fused_ok = device in _fused_adamw_devices() and all(p.is_floating_point() for p in params)
    if fused_ok:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def zero1(groups: list[dict[str, Any]], name: str, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """ZeRO-1 (torch.distributed.optim.ZeroRedundancyOptimizer): each process holds the state of
    its share of the parameters, updates them, and broadcasts them to the others; the same update
    as the plain optimizer. AdamW runs foreach, not fused: ZeRO's load_state_dict moves the
    0-dim step tensors to the CPU, where fused AdamW on CUDA cannot take them."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if name == "openai-adam":
        return ZeroRedundancyOptimizer(groups, optimizer_class=OpenAIAdam, **kwargs)
    return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, foreach=True, **kwargs)


# How an optimizer runs, not what it computes: this process's choice, never a checkpoint's.
IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The whole optimizer state in torch's layout (parameters by index, groups in order), which
    neither the number of processes nor ZeRO-1 changes: ZeRO-1's shards are gathered onto rank 0
    (every process must call; the others get None)."""
    if not _is_zero(optimizer):
        return optimizer.state_dict()
    optimizer.consolidate_state_dict(to=0)
    return optimizer.state_dict() if torch.distributed.get_rank() == 0 else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Loads `optimizer_state`'s result, written by any number of processes with or without ZeRO-1
    (ZeRO-1 keeps this process's share); `optimizer` keeps its own IMPLEMENTATION flags."""
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint's optimizer has {len(state['param_groups'])} parameter groups, this one "
            f"{len(optimizer.param_groups)}"
        )
    groups = [
        {**saved, **{k: now[k] for k in IMPLEMENTATION if k in now}}
        for saved, now in zip(state["param_groups"], optimizer.param_groups)
    ]
    optimizer.load_state_dict({**state, "state": dict(state["state"]), "param_groups": groups})  # ZeRO edits "state"


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this process holds (under ZeRO-1: its share)."""
    local = optimizer.optim if _is_zero(optimizer) else optimizer
    return sum(t.nbytes for s in local.state.values() for t in s.values() if isinstance(t, Tensor))


def _is_zero(optimizer: torch.optim.Optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _fused_adamw_devices() -> tuple[str, ...]:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except ImportError:  # private helper: fall back to what torch >= 2.4 supports
        return ("cuda", "cpu")


@dataclass
class Schedule:
    """Learning-rate multiplier of update k (0-based): linear warm-up, multiplier (k+1)/W,
    reaching 1 at update W-1; then decay over the remaining updates to 0 at update
    max_steps-1: cosine 0.5·(1 + cos(π·p)) or linear (1 - p), p = (k+1-W)/(max_steps-W)."""

    warmup_steps: int
    max_steps: int
    kind: str = "cosine"

    def __call__(self, k: int) -> float:
        W, N = self.warmup_steps, self.max_steps
        if k + 1 <= W:
            return (k + 1) / W
        if self.kind == "constant":
            return 1.0
        p = min(1.0, (k + 1 - W) / max(1, N - W))
        if self.kind == "linear":
            return 1.0 - p
        return 0.5 * (1.0 + math.cos(math.pi * p))
