"""The spec: what every fused op and the GPT-1 model *mean*, in plain PyTorch.

Each function here has the same positional signature as its fused twin in
``engine.ops`` (the Triton and C++ kernels are tested against these), plus two
test-only keywords:

* ``upcast=True`` computes in float32 and casts the result back to the input dtype
  (the "fp32 reference" of the FlashAttention numerics rule);
* ``dropout_mask`` (a boolean keep-mask) replaces the random draw, so a test can feed
  the exact mask a kernel used.

``ReferenceGPT1`` composes them into the paper's model (post-LN decoder, tied LM head).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model.config import GPT1Config


def _dropout(x: Tensor, p: float, mask: Tensor | None) -> Tensor:
    """Inverted dropout: zero with probability p, scale survivors by 1/(1-p)."""
    if mask is not None:
        return x * mask.to(x.dtype) / (1.0 - p) if p > 0 else x
    return F.dropout(x, p) if p > 0 else x


def causal_attention(
    qkv: Tensor,
    n_head: int,
    dropout_p: float = 0.0,
    *,
    upcast: bool = False,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """softmax(Q Kᵀ / √D + causal mask) V, per head, with dropout on the probabilities.

    qkv: (B, T, 3C), the fused QKV projection's output: Q = qkv[..., :C], K = qkv[..., C:2C],
    V = qkv[..., 2C:], head h at columns [h·D, (h+1)·D) of each. Returns (B, T, C), heads
    concatenated in the same order (what the output projection consumes).
    dropout_mask: optional (B, H, T, T) boolean keep-mask used instead of a random one.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    dtype = qkv.dtype
    if upcast:
        qkv = qkv.float()
    q, k, v = (t.view(B, T, n_head, D).transpose(1, 2) for t in qkv.split(C, dim=2))  # (B, H, T, D)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()
    att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    att = _dropout(att, dropout_p, dropout_mask)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
    return y.to(dtype)


def add_layernorm(
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    *,
    upcast: bool = False,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """y = LayerNorm(x + dropout(residual)) over the last dim: a post-LN block's join.

    x, residual: (..., C); weight, bias: (C,). dropout_mask: optional keep-mask shaped like
    residual. (x + r − mean) · rstd · weight + bias, with rstd = 1/√(var + eps), var biased.
    """
    dtype = x.dtype
    if upcast:
        x, residual, weight, bias = x.float(), residual.float(), weight.float(), bias.float()
    s = x + _dropout(residual, dropout_p, dropout_mask)
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps).to(dtype)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor, approximate: str = "tanh", *, upcast: bool = False) -> Tensor:
    """GELU(x Wᵀ + b): the FFN's first projection and its activation.

    weight: (F, C) as nn.Linear; approximate="tanh" is OpenAI's
    0.5·z·(1 + tanh(√(2/π)·(z + 0.044715·z³))), "none" the exact 0.5·z·(1 + erf(z/√2)).
    """
    dtype = x.dtype
    if upcast:
        x, weight, bias = x.float(), weight.float(), bias.float()
    return F.gelu(F.linear(x, weight, bias), approximate=approximate).to(dtype)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    *,
    upcast: bool = False,
) -> Tensor:
    """Mean cross-entropy of softmax(hidden Wᵀ) against targets: the tied LM head + loss.

    hidden: (..., C); weight: (V, C) (the token embedding); targets: (...) int64, entries equal
    to ignore_index do not count. Returns a float32 scalar (NaN when every target is ignored,
    as torch.nn.functional.cross_entropy).
    """
    if upcast:
        hidden, weight = hidden.float(), weight.float()
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()  # (N, V)
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index).float()


# ---- the model --------------------------------------------------------------------------


def embedding_tables(wte: Tensor, wpe: Tensor, p: float, mode: str) -> tuple[Tensor, Tensor]:
    """The (token, position) tables one forward pass reads. mode "sum" (transformers): as they
    are — the looked-up sum is dropped instead; "matrix" (OpenAI's code, which drops its one
    embedding matrix of tokens, special tokens and positions): every element of both tables
    dropped with probability p, one mask per pass, so the tied LM head reads the dropped token
    table too. Pass p = 0 outside training."""
    if mode == "matrix" and p > 0:
        return F.dropout(wte, p, True), F.dropout(wpe, p, True)
    return wte, wpe


def init_weights(module: nn.Module, std: float) -> None:
    """GPT-1's init: weights and embeddings N(0, std), biases 0, LayerNorm gains 1."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Attention(nn.Module):
    """The attention sub-layer's parameters (GPT1 shares this module layout)."""

    def __init__(self, cfg: GPT1Config) -> None:
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)


class MLP(nn.Module):
    """The FFN sub-layer's parameters."""

    def __init__(self, cfg: GPT1Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.n_inner)
        self.c_proj = nn.Linear(cfg.n_inner, cfg.n_embd)


class ReferenceBlock(nn.Module):
    """Post-LN: n = LN(x + drop(attn(x))); h = LN(n + drop(mlp(n)))."""

    def __init__(self, cfg: GPT1Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn = Attention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        attn_p = cfg.attn_pdrop if self.training else 0.0
        resid_p = cfg.resid_pdrop if self.training else 0.0
        eps = cfg.layer_norm_epsilon
        a = self.attn.c_proj(causal_attention(self.attn.c_attn(x), cfg.n_head, attn_p))
        n = add_layernorm(x, a, self.ln_1.weight, self.ln_1.bias, eps, resid_p)
        m = self.mlp.c_proj(linear_gelu(n, self.mlp.c_fc.weight, self.mlp.c_fc.bias, cfg.gelu_approximate))
        return add_layernorm(n, m, self.ln_2.weight, self.ln_2.bias, eps, resid_p)


class ReferenceGPT1(nn.Module):
    """The paper's model, plainly: embeddings → n_layer post-LN blocks → tied LM head.

    Parameter names are those of transformers' OpenAIGPTModel (with nn.Linear weights,
    i.e. transposed w.r.t. its Conv1D), so state dicts move freely between this, GPT1 and HF.
    """

    def __init__(self, cfg: GPT1Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokens_embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.positions_embed = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = nn.ModuleList(ReferenceBlock(cfg) for _ in range(cfg.n_layer))
        self.apply(lambda m: init_weights(m, cfg.initializer_range))

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, T) → logits (B, T, V)."""
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        p = self.cfg.embd_pdrop if self.training else 0.0
        wte, wpe = embedding_tables(self.tokens_embed.weight, self.positions_embed.weight, p, self.cfg.embd_dropout)
        x = F.embedding(input_ids, wte) + F.embedding(pos, wpe)
        if self.cfg.embd_dropout == "sum":
            x = self.drop(x)
        for block in self.h:
            x = block(x)
        return x @ wte.t()

    def loss(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Next-token cross-entropy: position t predicts labels[t + 1]; -100 is ignored."""
        logits = self(input_ids)
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
