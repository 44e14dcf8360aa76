"""Hugging Face `openai-gpt` checkpoint layout: read and write.

The layout: config.json (OpenAIGPTConfig fields) + model.safetensors (or the older
pytorch_model.bin) with OpenAIGPTModel's parameter names, optionally prefixed by
"transformer." (OpenAIGPTLMHeadModel), Conv1D weights stored (in, out) — the transpose of
nn.Linear's (out, in) — and an `lm_head.weight` tied to the token embedding.

This module knows the file layout only; GPT1 (engine.model.gpt1) checks the weights against
its own shapes, and engine.model.hf_export writes fine-tuned models for transformers' task classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from engine.fileio import atomic_write, atomic_write_text
from engine.model.config import GPT1Config

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


def read_pretrained(path: str | Path) -> tuple[GPT1Config, dict[str, Tensor]]:
    """Reads an openai-gpt directory into (config, state dict in GPT1's naming and layout),
    checking what the layout itself fixes: a tied LM head and as many layers as the config says
    (engine.model.gpt1.load_pretrained checks every shape before a model is allocated)."""
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
    if config.n_layer != len(layers):  # before anyone builds even a meta model of n_layer blocks
        raise ValueError(f"{path / CONFIG_NAME}: n_layer is {config.n_layer}, the weights hold {len(layers)} layers")
    return config, state


def save_pretrained(config: GPT1Config, state_dict: dict[str, Tensor], path: str | Path) -> None:
    """Writes config.json + model.safetensors (OpenAIGPTModel names, Conv1D layout), each atomically."""
    write_weights(Path(path), state_dict, config.to_hf_dict())


def write_weights(
    path: Path, body_state: dict[str, Tensor], hf_config: dict, prefix: str = "", extra: dict[str, Tensor] | None = None
) -> None:
    """model.safetensors (the body in the Conv1D layout, its names under `prefix`, then `extra`)
    and config.json (`hf_config`), each atomically."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        prefix + key: (value.t() if key.endswith(_CONV1D) else value).detach().to("cpu").contiguous()
        for key, value in body_state.items()
    }
    tensors.update({k: v.detach().to("cpu").contiguous() for k, v in (extra or {}).items()})
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(path / CONFIG_NAME, json.dumps(hf_config, indent=2) + "\n")
