"""Task heads on the GPT-1 body (the paper's §3.2–3.3), and the fine-tuning objective.

A head reads the final hidden state at each sequence's extract token, h: (B, S, C) with S the
sequences of one example (1; the 2 orders of a similarity pair; one per answer choice):

    classification / entailment   logits = W · drop(h[:, 0])              (B, n_labels)
    similarity                    logits = W · drop(h[:, 0] + h[:, 1])    (B, n_labels)
    regression                    score  = w · drop(h[:, 0] + h[:, 1])    (B,)   MSE
    multiple_choice               score_k = w · drop(h[:, k])             (B, S)  softmax over k

Dropout draws ONE mask per example, shared across its choices (as OpenAI's code: noise shape
[B, 1, C]); for the similarity sum, dropping the sum with one mask is the same as dropping both
orders with a shared mask. The objective is L3 = L2 + λ·L1: L2 the task loss, L1 the language-
model loss on the transformed sequences (pads ignored), λ = 0.5 in the paper (0 disables L1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model.gpt1 import GPT1, LOSS_AVERAGES
from engine.model.tokenizer import BPETokenizer

# What a head can read: one task kind each (engine.data.transforms builds their input sequences).
KINDS = ("classification", "entailment", "similarity", "regression", "multiple_choice")


class SharedDropout(nn.Module):
    """Dropout with one mask per example, shared along dim 1: x (B, S, C) * m (B, 1, C)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0], 1, *x.shape[2:]), device=x.device, dtype=x.dtype).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class TaskHead(nn.Module):
    """Dropout, then a linear layer on the extract-token states (see the module doc).

    For regression the head predicts the standardised score; ``target_mean`` / ``target_std``
    (buffers, saved with the head) map it back, so that at the paper's small learning rate the
    output does not have to travel from 0 to STS-B's mean of ~2.7 through the bias alone."""

    def __init__(
        self, kind: str, n_embd: int, n_labels: int = 1, pdrop: float = 0.1, initializer_range: float = 0.02
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")
        if kind in ("classification", "entailment", "similarity") and n_labels < 2:
            raise ValueError(f"a {kind} head needs n_labels >= 2, got {n_labels}")
        self.kind = kind
        self.n_out = n_labels if kind in ("classification", "entailment", "similarity") else 1
        self.dropout = SharedDropout(pdrop)
        self.linear = nn.Linear(n_embd, self.n_out)
        nn.init.normal_(self.linear.weight, std=initializer_range)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def forward(self, h: Tensor) -> Tensor:
        """h: (B, S, C) extract-token states → logits (B, n_labels), scores (B, S) or (B,)."""
        if self.kind in ("similarity", "regression"):
            if h.shape[1] != 2:
                raise ValueError(f"a {self.kind} head expects the 2 orders of a pair, got S={h.shape[1]}")
            h = h.sum(dim=1, keepdim=True)  # (B, 1, C): the two orders added before the linear layer
        elif self.kind != "multiple_choice" and h.shape[1] != 1:
            raise ValueError(f"a {self.kind} head expects 1 sequence per example, got S={h.shape[1]}")
        out = self.linear(self.dropout(h))  # (B, S', n_out)
        if self.kind == "multiple_choice":
            return out.squeeze(-1)  # (B, S): one score per choice
        if self.kind == "regression":
            return out[:, 0, 0]  # (B,)
        return out[:, 0]  # (B, n_labels)

    def loss(self, out: Tensor, labels: Tensor) -> Tensor:
        """L2: cross-entropy over labels or choices; MSE on the standardised score."""
        if self.kind == "regression":
            return F.mse_loss(out.float(), (labels.float() - self.target_mean) / self.target_std)
        return F.cross_entropy(out.float(), labels.long())

    def predict(self, out: Tensor) -> Tensor:
        """Class / choice index (long), or the score in the data's units (float)."""
        if self.kind == "regression":
            return out.float() * self.target_std + self.target_mean
        return out.argmax(dim=-1)

    def set_target_stats(self, values: Tensor) -> None:
        """Regression: standardise by the training scores' mean and std."""
        values = values.float()
        self.target_mean.fill_(values.mean().item())
        self.target_std.fill_(max(values.std().item(), 1e-6) if values.numel() > 1 else 1.0)


@dataclass
class TaskOutput:
    """loss: L3 = L2 + λ·L1 (None without labels); task_loss: L2; lm_loss: L1 (None when λ = 0
    or no LM labels); out: the head's logits / scores."""

    loss: Tensor | None
    task_loss: Tensor | None
    lm_loss: Tensor | None
    out: Tensor


def combine_losses(task_loss: Tensor, lm_loss: Tensor | None, lm_coef: float) -> Tensor:
    """L3 = L2 + λ·L1 (the paper's eq. 5); L1 is skipped when λ = 0 or absent."""
    if lm_coef == 0 or lm_loss is None:
        return task_loss
    return task_loss + lm_coef * lm_loss


class GPT1ForTask(nn.Module):
    """The GPT-1 body and a task head; one module, so DDP and checkpoints see both."""

    def __init__(self, body: GPT1, head: TaskHead, lm_coef: float = 0.5, lm_average: str = "token") -> None:
        """lm_average: how L1 averages — "token" (over every counted token of the batch) or
        "sequence" (OpenAI's: per sequence, then over sequences; see GPT1.forward)."""
        super().__init__()
        if lm_coef < 0:
            raise ValueError(f"lm_coef must be >= 0, got {lm_coef}")
        if lm_average not in LOSS_AVERAGES:
            raise ValueError(f"lm_average must be one of {LOSS_AVERAGES}, got {lm_average!r}")
        self.body, self.head, self.lm_coef, self.lm_average = body, head, lm_coef, lm_average

    def forward(
        self, input_ids: Tensor, extract: Tensor, labels: Tensor | None = None, lm_labels: Tensor | None = None
    ) -> TaskOutput:
        """input_ids, lm_labels: (B, S, T); extract: (B, S) extract-token positions; labels: (B,)."""
        B, S, T = input_ids.shape
        want_lm = self.lm_coef > 0 and lm_labels is not None
        body = self.body(
            input_ids.reshape(B * S, T),
            labels=lm_labels.reshape(B * S, T) if want_lm else None,
            return_logits=False,
            loss_average=self.lm_average,
        )
        rows = torch.arange(B * S, device=input_ids.device)
        h = body.hidden_states[rows, extract.reshape(B * S)].view(B, S, -1)  # (B, S, C)
        out = self.head(h)
        if labels is None:
            return TaskOutput(None, None, body.loss, out)
        task_loss = self.head.loss(out, labels)
        return TaskOutput(combine_losses(task_loss, body.loss, self.lm_coef), task_loss, body.loss, out)


def add_task_tokens(body: GPT1, tokenizer: BPETokenizer) -> None:
    """Appends start / delimiter / extract / pad to the vocabulary and gives them embedding
    rows drawn from N(0, initializer_range), as the paper's new tokens."""
    fresh = any(tokenizer.token_to_id(t) is None for t in ("<start>", "<delim>", "<classify>", "<pad>"))
    sp = tokenizer.add_special_tokens()
    if body.config.vocab_size < tokenizer.vocab_size:
        body.resize_token_embeddings(tokenizer.vocab_size)  # new rows: N(0, 0.02)
    elif fresh:  # the table already has rows there (a padded vocabulary): draw them anew
        with torch.no_grad():
            for i in (sp.start, sp.delimiter, sp.classify, sp.pad):
                body.tokens_embed.weight[i].normal_(0.0, body.config.initializer_range)
