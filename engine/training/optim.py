"""OpenAI's Adam, as GPT-1 was trained with it (openai/finetune-transformer-lm, opt.py).

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
from typing import Any, Iterable

import torch
from torch import Tensor


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
