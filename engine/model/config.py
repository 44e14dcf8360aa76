"""GPT1Config: the model's shape and regularisation, one typed dataclass.

Field names follow transformers' ``OpenAIGPTConfig`` so that a Hugging Face
``config.json`` maps one to one; ``n_inner`` (the FFN width) is the one addition.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Activation names. OpenAI's code and transformers' OpenAIGPT both mean the tanh
# approximation by "gelu"; the exact erf form is opt-in.
ACTIVATIONS = {"gelu": "tanh", "gelu_new": "tanh", "gelu_exact": "none"}


@dataclass
class GPT1Config:
    vocab_size: int = field(
        default=40478, metadata={"help": "tokens in the vocabulary (GPT-1: 40,000 BPE merges + 478 base symbols)"}
    )
    n_positions: int = field(default=512, metadata={"help": "longest sequence: rows of the learned position table"})
    n_embd: int = field(default=768, metadata={"help": "width of the residual stream"})
    n_layer: int = field(default=12, metadata={"help": "number of Transformer blocks"})
    n_head: int = field(default=12, metadata={"help": "attention heads per block; must divide n_embd"})
    n_inner: int | None = field(
        default=None, metadata={"help": "FFN hidden width; None means 4 * n_embd (GPT-1: 3072)"}
    )
    afn: str = field(
        default="gelu",
        metadata={
            "help": "activation: 'gelu' (OpenAI's tanh form, as transformers' openai-gpt), 'gelu_new' (same), "
            "'gelu_exact' (erf)"
        },
    )
    resid_pdrop: float = field(
        default=0.1, metadata={"help": "dropout on each sub-layer's output before the residual add"}
    )
    embd_pdrop: float = field(default=0.1, metadata={"help": "embedding dropout probability (where: embd_dropout)"})
    embd_dropout: str = field(
        default="sum",
        metadata={
            "help": "'sum': drop the token + position sum (transformers); 'matrix': drop elements of the whole "
            "embedding tables, one mask per pass, seen by the tied LM head too (OpenAI's code)"
        },
    )
    attn_pdrop: float = field(default=0.1, metadata={"help": "dropout on the attention probabilities"})
    layer_norm_epsilon: float = field(default=1e-5, metadata={"help": "LayerNorm epsilon"})
    initializer_range: float = field(
        default=0.02, metadata={"help": "std of the N(0, std) init of weights and embeddings"}
    )

    def __post_init__(self) -> None:
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT1Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPT1Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"GPT1Config.{name} must be a probability in [0, 1), got {value!r}")
        if not isinstance(self.embd_dropout, str) or self.embd_dropout not in EMBEDDING_DROPOUT:
            raise ValueError(f"GPT1Config.embd_dropout must be one of {EMBEDDING_DROPOUT}, got {self.embd_dropout!r}")
        if not isinstance(self.afn, str) or self.afn not in ACTIVATIONS:
            raise ValueError(f"GPT1Config.afn must be one of {sorted(ACTIVATIONS)}, got {self.afn!r}")
        for name in ("layer_norm_epsilon", "initializer_range"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 < value < math.inf:
                raise ValueError(f"GPT1Config.{name} must be a finite number > 0, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def gelu_approximate(self) -> str:
        """The ``approximate`` argument of ``torch.nn.functional.gelu`` for ``afn``."""
        return ACTIVATIONS[self.afn]

    def num_parameters(self) -> int:
        """Trainable parameters (LM head tied to the token embedding)."""
        C, F = self.n_embd, self.n_inner
        block = (C * 3 * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C) + 4 * C
        return self.vocab_size * C + self.n_positions * C + self.n_layer * block

    # ---- presets ---------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "GPT1Config":
        """A preset by name, with keyword overrides (e.g. ``vocab_size`` of a new tokenizer)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- Hugging Face config.json ----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of transformers' OpenAIGPTConfig (plus n_inner), ready for config.json."""
        return {
            "architectures": ["OpenAIGPTLMHeadModel"],
            "model_type": "openai-gpt",
            **self.to_dict(),
            "tie_word_embeddings": True,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPT1Config":
        """Reads our own dict or a Hugging Face openai-gpt config (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        # A HF config has no n_inner: openai-gpt's FFN is 4 * n_embd.
        kwargs.setdefault("n_inner", None)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "GPT1Config":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ValueError as e:  # a field's message, with the file it came from
            raise ValueError(f"{path}: {e}") from None


def _is_number(value: Any) -> bool:
    """int or float, but not bool (JSON's true would otherwise read as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


EMBEDDING_DROPOUT = ("sum", "matrix")

# Same architecture at several sizes. "gpt1" is the paper's model; "gpt1-small" trains a
# visible amount in a few minutes on 2 CPU cores; "gpt1-tiny" is for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt1": {},
    "gpt1-medium": dict(n_layer=8, n_embd=512, n_head=8),
    "gpt1-small": dict(n_layer=4, n_embd=256, n_head=4, n_positions=256),
    "gpt1-tiny": dict(n_layer=2, n_embd=64, n_head=4, n_positions=64),
}
