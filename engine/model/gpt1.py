"""GPT1: the lean decoder users import; a drop-in nn.Module in the Hugging Face layout.

    model = GPT1(GPT1Config.from_name("gpt1"), fused=True)
    out = model(input_ids, labels=input_ids)        # out.loss, out.hidden_states
    model.generate(prompt, max_new_tokens=50, top_k=40)

Every op with a fused kernel goes through one namespace chosen at construction:
``engine.ops`` (fused: C++ on CPU, Triton on CUDA, picked by the dispatcher) or
``engine.model.reference`` (plain PyTorch). Parameter names match transformers' OpenAIGPTModel
(weights in nn.Linear layout), so ``state_dict``s move between this, ``ReferenceGPT1`` and HF.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine import ops
from engine.model import hf, reference
from engine.model.config import GPT1Config
from engine.model.reference import MLP, Attention, init_weights

IGNORE_INDEX = -100


@dataclass
class GPT1Output:
    """loss: mean next-token CE (None without labels/targets); logits: (B, T, V), computed only
    when asked for or when there is no loss (the fused LM-head loss never builds them);
    hidden_states: (B, T, C), the last block's output (what task heads read)."""

    loss: Tensor | None
    logits: Tensor | None
    hidden_states: Tensor


@dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding: (n_layer, B, H, n_positions, D)."""

    k: Tensor
    v: Tensor
    length: int = 0


class Block(nn.Module):
    """Post-LN: n = LN(x + drop(attn(x))); h = LN(n + drop(mlp(n))). Dropout of the residual
    branches happens inside add_layernorm (fused: no mask tensor)."""

    def __init__(self, cfg: GPT1Config, fn: ModuleType, index: int) -> None:
        super().__init__()
        self.cfg, self.fn, self.index = cfg, fn, index
        self.attn = Attention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        cfg, fn = self.cfg, self.fn
        resid_p = cfg.resid_pdrop if self.training else 0.0
        eps = cfg.layer_norm_epsilon
        qkv = self.attn.c_attn(x)  # (B, T, 3C)
        if cache is None:
            a = fn.causal_attention(qkv, cfg.n_head, cfg.attn_pdrop if self.training else 0.0)
        else:
            a = self._attend_cached(qkv, cache)
        n = fn.add_layernorm(x, self.attn.c_proj(a), self.ln_1.weight, self.ln_1.bias, eps, resid_p)
        m = self.mlp.c_proj(fn.linear_gelu(n, self.mlp.c_fc.weight, self.mlp.c_fc.bias, cfg.gelu_approximate))
        return fn.add_layernorm(n, m, self.ln_2.weight, self.ln_2.bias, eps, resid_p)

    def _attend_cached(self, qkv: Tensor, cache: KVCache) -> Tensor:
        """Decoding: store this step's K/V, attend over everything cached so far. One query
        against the cache is a matrix-vector product; SDPA serves it on every device."""
        B, T, _ = qkv.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        start, end = cache.length, cache.length + T
        cache.k[self.index, :, :, start:end] = k
        cache.v[self.index, :, :, start:end] = v
        # A prompt (start == 0) is causal within itself; a single new token sees all the cache.
        a = F.scaled_dot_product_attention(
            q, cache.k[self.index, :, :, :end], cache.v[self.index, :, :, :end], is_causal=T > 1
        )
        return a.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C)


LOSS_AVERAGES = ("token", "sequence")


class GPT1(nn.Module):
    """GPT-1 decoder with a tied LM head. ``fused=True`` runs engine.ops, else engine.model.reference."""

    def __init__(self, config: GPT1Config, fused: bool = True) -> None:
        super().__init__()
        if not isinstance(config, GPT1Config):
            raise TypeError(f"GPT1 expects a GPT1Config, got {type(config).__name__}")
        self.config = dataclasses.replace(config)  # our own copy: resize_token_embeddings edits it
        self.fused = bool(fused)
        self.fn = fn = ops if self.fused else reference
        self.tokens_embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.positions_embed = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config, fn, i) for i in range(config.n_layer))
        self.apply(lambda m: init_weights(m, config.initializer_range))

    # ---- forward ----------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        targets: Tensor | None = None,
        return_logits: bool | None = None,
        loss_average: str = "token",
    ) -> GPT1Output:
        """input_ids (B, T). ``labels`` (B, T) are shifted inside (position t predicts labels[t+1],
        as transformers); ``targets`` (B, T) are already aligned (position t predicts targets[t]).
        Entries equal to -100 are ignored by the loss. ``loss_average``: "token" — the mean over
        every counted token (transformers); "sequence" — each sequence's mean over its tokens,
        then the mean over the sequences that have any (OpenAI's auxiliary LM loss)."""
        if loss_average not in LOSS_AVERAGES:
            raise ValueError(f"loss_average must be one of {LOSS_AVERAGES}, got {loss_average!r}")
        self._check_tokens(input_ids, "input_ids")
        if labels is not None and targets is not None:
            raise ValueError("pass labels (shifted inside) or targets (already aligned), not both")
        if labels is not None:
            self._check_tokens(labels, "labels", like=input_ids, allow_ignore=True)
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # the last position predicts nothing
        elif targets is not None:
            self._check_tokens(targets, "targets", like=input_ids, allow_ignore=True)

        wte, wpe = self._tables()
        x = self._embed(input_ids, 0, wte, wpe)
        for block in self.h:
            x = block(x)

        loss = None
        if targets is not None:
            loss = self._lm_loss(x, wte, targets.long(), loss_average)
        if return_logits is None:
            return_logits = loss is None
        logits = F.linear(x, wte) if return_logits else None
        return GPT1Output(loss=loss, logits=logits, hidden_states=x)

    def _lm_loss(self, x: Tensor, wte: Tensor, targets: Tensor, average: str) -> Tensor:
        if average == "token":
            return self.fn.linear_cross_entropy(x, wte, targets, IGNORE_INDEX)
        # One fused LM-head call per sequence: its mean over its own tokens. A sequence with no
        # counted token gets a stand-in target and weight 0 (no NaN, no host sync).
        counted = (targets != IGNORE_INDEX).any(dim=1)  # (B,)
        safe = targets.clone()
        safe[:, 0] = torch.where(counted, targets[:, 0], torch.zeros_like(targets[:, 0]))
        per_seq = torch.stack(
            [self.fn.linear_cross_entropy(x[i], wte, safe[i], IGNORE_INDEX) for i in range(x.shape[0])]
        )
        w = counted.to(per_seq.dtype)
        return (per_seq * w).sum() / w.sum().clamp(min=1.0)

    def _tables(self) -> tuple[Tensor, Tensor]:
        """The embedding tables this pass reads (dropped whole under embd_dropout="matrix")."""
        p = self.config.embd_pdrop if self.training else 0.0
        return reference.embedding_tables(
            self.tokens_embed.weight, self.positions_embed.weight, p, self.config.embd_dropout
        )

    def _embed(self, input_ids: Tensor, start: int, wte: Tensor | None = None, wpe: Tensor | None = None) -> Tensor:
        if wte is None or wpe is None:
            wte, wpe = self._tables()
        pos = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = F.embedding(input_ids, wte) + F.embedding(pos, wpe)
        return self.drop(x) if self.config.embd_dropout == "sum" else x

    def _check_tokens(self, ids: Tensor, name: str, like: Tensor | None = None, allow_ignore: bool = False) -> None:
        """Bad ids become a ValueError here, never an out-of-bounds read or device-side assert."""
        if not isinstance(ids, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must hold int64 or int32 token ids, got dtype {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, seq_len), got shape {tuple(ids.shape)}")
        if like is not None and ids.shape != like.shape:
            raise ValueError(f"{name} shape {tuple(ids.shape)} must equal input_ids shape {tuple(like.shape)}")
        T, P, V = ids.shape[1], self.config.n_positions, self.config.vocab_size
        if T == 0:
            raise ValueError(f"{name} is empty (seq_len 0)")
        if T > P:
            raise ValueError(f"{name} has seq_len {T}, longer than n_positions={P}")
        if torch.compiler.is_compiling():
            return  # value checks need a host sync, which would break the graph
        bad = (ids < 0) | (ids >= V)
        if allow_ignore:
            bad &= ids != IGNORE_INDEX
        if bad.any():
            value = ids[bad][0].item()
            allowed = f"[0, {V}) or {IGNORE_INDEX}" if allow_ignore else f"[0, {V})"
            raise ValueError(f"{name} holds token id {value}, outside {allowed} (vocab_size={V})")

    # ---- generation -------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples max_new_tokens after input_ids (B, T) with a KV cache; returns (B, T + new).
        temperature 0 is greedy; top_k keeps the k most likely tokens. Dropout is off."""
        steps = self.generate_stream(input_ids, max_new_tokens, temperature, top_k, generator)
        return torch.cat([input_ids, *steps], dim=1)

    def generate_stream(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """``generate`` one token at a time: yields each new (B, 1) step as soon as it is drawn.
        The arguments are checked here, before the first token (not when iteration starts)."""
        self._check_tokens(input_ids, "input_ids")
        _check_sampling(max_new_tokens, temperature, top_k, generator)
        T, P = input_ids.shape[1], self.config.n_positions
        if T + max_new_tokens > P:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds n_positions={P}")
        device = self.tokens_embed.weight.device
        if generator is not None and generator.device.type != device.type:
            raise ValueError(
                f"generator is on {generator.device}, the model on {device}; make it with torch.Generator(device=...)"
            )
        return self._decode(input_ids, max_new_tokens, float(temperature), top_k, generator)

    @torch.no_grad()
    def _decode(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
    ) -> Iterator[Tensor]:
        cfg, p = self.config, self.tokens_embed.weight
        shape = (cfg.n_layer, input_ids.shape[0], cfg.n_head, input_ids.shape[1] + max_new_tokens, cfg.head_dim)
        cache = KVCache(p.new_empty(shape), p.new_empty(shape))
        was_training = self.training
        self.eval()
        try:
            step = input_ids
            for _ in range(max_new_tokens):
                x = self._embed(step, cache.length)
                for block in self.h:
                    x = block(x, cache)
                cache.length += step.shape[1]
                logits = F.linear(x[:, -1], self.tokens_embed.weight).float()  # (B, V)
                step = _sample(logits, temperature, top_k, generator).to(input_ids.dtype)
                yield step
        finally:
            self.train(was_training)

    # ---- vocabulary and Hugging Face I/O -------------------------------------------------

    def reset_blocks(self, first: int) -> None:
        """Re-initialises blocks first .. n_layer-1 as a new model would be (N(0, initializer_
        range) weights, zero biases, unit LayerNorms), keeping the embeddings and blocks
        0 .. first-1: a model loaded from a pretrained run then transfers `first` layers
        (the paper's §5 "Impact of number of layers transferred", OpenAI's n_transfer)."""
        if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first <= self.config.n_layer:
            raise ValueError(f"layers transferred must be an integer in [0, {self.config.n_layer}], got {first!r}")
        for block in self.h[first:]:
            block.apply(lambda m: init_weights(m, self.config.initializer_range))

    def resize_token_embeddings(self, vocab_size: int) -> None:
        """Grows (or shrinks) the tied embedding; new rows are N(0, initializer_range)."""
        old = self.tokens_embed
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        new = nn.Embedding(vocab_size, self.config.n_embd, device=old.weight.device, dtype=old.weight.dtype)
        init_weights(new, self.config.initializer_range)
        with torch.no_grad():
            n = min(vocab_size, old.num_embeddings)
            new.weight[:n] = old.weight[:n]
        self.tokens_embed = new
        self.config.vocab_size = vocab_size

    @classmethod
    def from_pretrained(cls, path: str | Path, fused: bool = True) -> "GPT1":
        """Loads a directory in transformers' openai-gpt layout (config.json + model.safetensors,
        or pytorch_model.bin read with torch.load(weights_only=True))."""
        config, state_dict = load_pretrained(path)
        model = cls(config, fused=fused)
        model.load_state_dict(state_dict)
        return model

    def save_pretrained(self, path: str | Path) -> None:
        """Writes config.json + model.safetensors in the openai-gpt layout, atomically."""
        hf.save_pretrained(self.config, self.state_dict(), path)


def load_pretrained(path: str | Path) -> tuple[GPT1Config, dict[str, Tensor]]:
    """(config, state dict) of an openai-gpt directory (engine.model.hf), every tensor checked
    against GPT1's names and shapes for that config before any model is allocated: a
    config.json claiming vocab_size 1e11 is refused here instead of exhausting memory."""
    config, state = hf.read_pretrained(path)
    with torch.device("meta"):  # GPT1's own names and shapes, nothing allocated
        expected = {k: v.shape for k, v in GPT1(config, fused=False).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the config (missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, the config implies {tuple(shape)}")
    return config, state


def _check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> None:
    """A ValueError naming the argument for every value sampling cannot use (bools are not
    numbers here: top_k=True would silently mean 1)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Next token (B, 1) from logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
