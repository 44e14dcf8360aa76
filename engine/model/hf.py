"""Hugging Face `openai-gpt` checkpoint layout: read and write.

The layout: config.json (OpenAIGPTConfig fields) + model.safetensors (or the older
pytorch_model.bin) with OpenAIGPTModel's parameter names, optionally prefixed by
"transformer." (OpenAIGPTLMHeadModel), Conv1D weights stored (in, out) — the transpose of
nn.Linear's (out, in) — and an `lm_head.weight` tied to the token embedding.

A fine-tuned run (body + task head) is written for transformers' task classes by
`save_task_model`; the table above it says which class each head kind maps onto, and how.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from engine.fileio import atomic_write, atomic_write_text
from engine.model.config import GPT1Config

if TYPE_CHECKING:
    from engine.model.gpt1 import GPT1
    from engine.model.heads import TaskHead
    from engine.model.tokenizer import BPETokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_WEIGHTS_NAME = "pytorch_model.bin"
# Conv1D weights: (in, out) in the HF file, (out, in) in our nn.Linear modules.
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Non-parameter buffers some HF versions saved (the causal mask); we build ours on the fly.
_IGNORED = (".attn.bias", ".attn.masked_bias")


def _read_weights(path: Path) -> dict[str, Tensor]:
    st, pt = path / WEIGHTS_NAME, path / LEGACY_WEIGHTS_NAME
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{st} is not a readable safetensors file: {e}") from None
    if pt.is_file():
        try:
            return torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle and zip errors come in many types
            raise ValueError(f"{pt} could not be read with torch.load(weights_only=True): {e}") from None
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME} in {path}")


def expected_shapes(config: GPT1Config) -> dict[str, torch.Size]:
    """GPT1's parameter names and shapes for `config`, from a model built on the meta device:
    nothing is allocated, so a config.json claiming vocab_size 1e11 is refused by the shape
    check instead of exhausting memory."""
    from engine.model.gpt1 import GPT1  # the expected names come from the model itself

    with torch.device("meta"):
        model = GPT1(config, fused=False)
    return {k: v.shape for k, v in model.state_dict().items()}


def load_pretrained(path: str | Path) -> tuple[GPT1Config, dict[str, Tensor]]:
    """Reads an openai-gpt directory into (config, state dict in GPT1's naming and layout).
    The config is checked against the weights' shapes here, before any model is allocated."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected config.json + {WEIGHTS_NAME})")
    config = GPT1Config.from_json_file(path / CONFIG_NAME)
    raw = _read_weights(path)
    state: dict[str, Tensor] = {}
    lm_head = None
    for key, value in raw.items():
        key = key.removeprefix("transformer.")
        if key == "lm_head.weight":
            lm_head = value
            continue
        if key.endswith(_IGNORED):
            continue
        state[key] = value.t().contiguous() if key.endswith(_CONV1D) else value
    if (
        lm_head is not None
        and "tokens_embed.weight" in state
        and not torch.equal(lm_head, state["tokens_embed.weight"])
    ):
        raise ValueError(f"{path}: lm_head.weight differs from tokens_embed.weight; GPT-1's LM head is tied")

    layers = {int(k.split(".")[1]) for k in state if k.startswith("h.") and k.split(".")[1].isdigit()}
    if config.n_layer != len(layers):  # before building even a meta model of n_layer blocks
        raise ValueError(f"{path / CONFIG_NAME}: n_layer is {config.n_layer}, the weights hold {len(layers)} layers")
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the config (missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, the config implies {tuple(shape)}")
    return config, state


def save_pretrained(config: GPT1Config, state_dict: dict[str, Tensor], path: str | Path) -> None:
    """Writes config.json + model.safetensors (OpenAIGPTModel names, Conv1D layout), each atomically."""
    _write(Path(path), state_dict, config.to_hf_dict())


def _write(
    path: Path, body_state: dict[str, Tensor], hf_config: dict, prefix: str = "", extra: dict[str, Tensor] | None = None
) -> None:
    """model.safetensors (body in the Conv1D layout, names under `prefix`, then `extra`) and
    config.json, each atomically."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        prefix + key: (value.t() if key.endswith(_CONV1D) else value).detach().to("cpu").contiguous()
        for key, value in body_state.items()
    }
    tensors.update({k: v.detach().to("cpu").contiguous() for k, v in (extra or {}).items()})
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(path / CONFIG_NAME, json.dumps(hf_config, indent=2) + "\n")


# ---- fine-tuned runs for transformers ---------------------------------------------------------
#
# A task head is a linear layer (with a bias) on the extract token's final state (engine.model.heads).
# How each kind maps onto transformers' OpenAIGPT classes, exactly (the same outputs to fp32
# rounding), given the run's transformed sequences (engine.predict.Predictor.batch: input_ids
# (B, S, T) right-padded, extract positions (B, S)):
#
#   classification, entailment → OpenAIGPTForSequenceClassification on input_ids[:, 0]: its
#       logits are read at the last non-pad token (config.pad_token_id is the run's pad), which
#       is the extract token.
#   similarity, regression → OpenAIGPTForSequenceClassification on each of the 2 orders, the
#       two logits ADDED: the head adds the orders' states before its linear layer, so each
#       order carries half the bias (regression: the standardisation is folded into the
#       layer, so the sum is the score in the data's units; num_labels = 1).
#   multiple_choice → OpenAIGPTDoubleHeadsModel(input_ids, mc_token_ids=extract): mc_logits
#       (B, S) are the head's choice scores; the model keeps its (tied) LM head.
#
# ForSequenceClassification's `score` layer has no bias, so the head's bias c is moved into the
# last LayerNorm's bias: β' = β + δ with W·δ = c (δ by least squares: exact while W has full
# row rank, n_labels <= n_embd). That model's hidden states are therefore shifted by δ; it has
# no LM head, so nothing else reads them: it is a classifier, not a language model.
# DoubleHeadsModel fixes num_labels to 1, so it only fits multiple choice.
# Not mapped: the head's dropout shares one mask across an example's sequences; transformers
# drops each sequence on its own, which differs in training only.

# The exported tokenizer.json adds the input transformation's tokens itself (a post-processor:
# "<start> a <classify>", "<start> a <delim> b <classify>") and tokenizer_config.json names the
# pad token, so transformers' AutoTokenizer and pipeline("text-classification") reproduce a
# classification or entailment run's predictions on inputs that fit its max_len (the run cuts
# longer ones longest-segment-first; a transformers tokenizer does not).

SEQUENCE_CLASSIFICATION = "OpenAIGPTForSequenceClassification"
DOUBLE_HEADS = "OpenAIGPTDoubleHeadsModel"


def _head_as_sequence_classifier(body_state: dict[str, Tensor], n_layer: int, head: TaskHead) -> dict[str, Tensor]:
    """score.weight, and the bias folded into the last LayerNorm (see above); edits body_state."""
    w = head.linear.weight.detach().to("cpu", torch.float64)  # (n_out, C)
    c = head.linear.bias.detach().to("cpu", torch.float64)  # (n_out,)
    if head.kind == "regression":  # prediction = out * std + mean, folded into the layer
        std, mean = float(head.target_std), float(head.target_mean)
        w, c = w * std, c * std + mean
    if head.kind in ("similarity", "regression"):
        c = c / 2  # each order's logits carry half: their sum has the bias once
    delta = torch.linalg.lstsq(w, c.unsqueeze(1)).solution.squeeze(1)  # W·δ = c
    if (w @ delta - c).abs().max() > 1e-6 * max(1.0, c.abs().max().item()):
        raise ValueError("the head's weight is rank-deficient: its bias cannot move into the last LayerNorm")
    key = f"h.{n_layer - 1}.ln_2.bias"
    body_state[key] = (body_state[key].double() + delta).to(body_state[key].dtype)
    return {"score.weight": w.float()}


def save_task_model(body: GPT1, head: TaskHead, labels: Sequence[str], pad_token_id: int, path: str | Path) -> str:
    """Writes a fine-tuned GPT1 body + TaskHead as a transformers model directory (config.json
    + model.safetensors); returns the class to load it with (see the table above)."""
    path = Path(path)
    config = body.config
    body_state = {k: v.detach().to("cpu") for k, v in body.state_dict().items()}
    extra: dict = {"pad_token_id": pad_token_id}
    if head.kind == "multiple_choice":
        name = DOUBLE_HEADS
        head_state = {
            "multiple_choice_head.summary.weight": head.linear.weight.detach().to("cpu"),
            "multiple_choice_head.summary.bias": head.linear.bias.detach().to("cpu"),
        }
        extra.update(
            summary_type="cls_index",
            summary_use_proj=True,
            summary_proj_to_labels=True,
            summary_activation=None,
            summary_first_dropout=head.dropout.p,
            summary_last_dropout=0.0,
        )
    else:
        name = SEQUENCE_CLASSIFICATION
        head_state = _head_as_sequence_classifier(body_state, config.n_layer, head)
    names = list(labels) if labels else ["score"]
    hf_config = {
        **config.to_hf_dict(),
        **extra,
        "architectures": [name],
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
        "gpt1_task_kind": head.kind,
    }
    _write(path, body_state, hf_config, prefix="transformer.", extra=head_state)
    return name


def save_task_tokenizer(tokenizer: BPETokenizer, max_len: int, path: str | Path) -> None:
    """tokenizer.json with the transformation's special tokens as a post-processor, and
    tokenizer_config.json (pad token, max length) for transformers (see above)."""
    from tokenizers import Tokenizer, processors

    path = Path(path)
    sp = tokenizer.special_tokens()
    tokenizer.save(path / "tokenizer.json")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single="<start> $A <classify>",
        pair="<start> $A <delim> $B:1 <classify>:1",
        special_tokens=[("<start>", sp.start), ("<delim>", sp.delimiter), ("<classify>", sp.classify)],
    )
    atomic_write(path / "tokenizer.json", lambda tmp: tok.save(str(tmp)))
    config = {"pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": max_len}
    atomic_write_text(path / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
