"""One training step (forward + backward + AdamW) for each provider, at the benchmark shapes.

Providers: "eager" GPT1(fused=False) (the reference ops), "compile" torch.compile of it,
"fused" GPT1(fused=True), "hf" transformers' OpenAIGPTLMHeadModel with the same weights; and
"eager-bf16", "compile-bf16", "fused-bf16": the same models with the forward under
torch.autocast(device, torch.bfloat16) (fp32 master weights, backward outside the context, as
engine.training.trainer runs it).
"""

from __future__ import annotations

from typing import Callable

import torch

from engine import GPT1, GPT1Config

from .conftest import SHAPES

BF16_PROVIDERS = ["eager-bf16", "compile-bf16", "fused-bf16"]
PROVIDERS = ["eager", "compile", "fused", "hf"] + BF16_PROVIDERS


def split_provider(provider: str) -> tuple[str, bool]:
    """("fused", True) for "fused-bf16": the model provider and whether it runs under bf16 autocast."""
    return provider.removesuffix("-bf16"), provider.endswith("-bf16")


def step_config() -> GPT1Config:
    return GPT1Config.from_name(
        SHAPES.preset, n_embd=SHAPES.C, n_head=SHAPES.H, n_positions=max(SHAPES.T, 256), vocab_size=SHAPES.V
    )


def build_step(provider: str, seed: int = 0) -> Callable[[], float]:
    """Returns step() → loss, running one optimisation step of `provider`'s model."""
    torch.manual_seed(seed)
    provider, bf16 = split_provider(provider)
    cfg = step_config()
    base = GPT1(cfg, fused=provider == "fused").train()
    if provider == "hf":
        import tempfile

        from transformers import OpenAIGPTLMHeadModel

        with tempfile.TemporaryDirectory() as d:
            base.save_pretrained(d)
            model = OpenAIGPTLMHeadModel.from_pretrained(d).train()
        loss_of = lambda ids: model(ids, labels=ids).loss  # noqa: E731
    else:
        model = torch.compile(base) if provider == "compile" else base
        loss_of = lambda ids: model(ids, labels=ids).loss  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, weight_decay=0.01, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (SHAPES.B, SHAPES.T))

    def step() -> float:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step
