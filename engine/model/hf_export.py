"""A fine-tuned model (GPT1 body + TaskHead) written for transformers' task classes
(`python -m engine.predict RUN --export-hf DIR`, engine.predict.Predictor.export_hf).

A task head is a linear layer (with a bias) on the extract token's final state (engine.model.heads).
How each kind maps onto transformers' OpenAIGPT classes, exactly (the same outputs to fp32
rounding), given the run's transformed sequences (engine.predict.Predictor.batch: input_ids
(B, S, T) right-padded, extract positions (B, S)):

  classification, entailment → OpenAIGPTForSequenceClassification on input_ids[:, 0]: its
      logits are read at the last non-pad token (config.pad_token_id is the run's pad), which
      is the extract token.
  similarity, regression → OpenAIGPTForSequenceClassification on each of the 2 orders, the
      two logits ADDED: the head adds the orders' states before its linear layer, so each
      order carries half the bias (regression: the standardisation is folded into the
      layer, so the sum is the score in the data's units; num_labels = 1).
  multiple_choice → OpenAIGPTDoubleHeadsModel(input_ids, mc_token_ids=extract): mc_logits
      (B, S) are the head's choice scores; the model keeps its (tied) LM head.

ForSequenceClassification's `score` layer has no bias, so the head's bias c is moved into the
last LayerNorm's bias: β' = β + δ with W·δ = c (δ by least squares: exact while W has full
row rank, n_labels <= n_embd). That model's hidden states are therefore shifted by δ; it has
no LM head, so nothing else reads them: it is a classifier, not a language model.
DoubleHeadsModel fixes num_labels to 1, so it only fits multiple choice.
Not mapped: the head's dropout shares one mask across an example's sequences; transformers
drops each sequence on its own, which differs in training only.

The exported tokenizer.json adds the input transformation's tokens itself (a post-processor:
"<start> a <classify>", "<start> a <delim> b <classify>") and tokenizer_config.json names the
pad token, so transformers' AutoTokenizer and pipeline("text-classification") reproduce a
classification or entailment run's predictions on inputs that fit its max_len (the run cuts
longer ones longest-segment-first; a transformers tokenizer does not).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from engine.fileio import atomic_write, atomic_write_text
from engine.model.gpt1 import GPT1
from engine.model.heads import TaskHead
from engine.model.hf import write_weights
from engine.model.tokenizer import BPETokenizer

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
    write_weights(path, body_state, hf_config, prefix="transformer.", extra=head_state)
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
