"""Tiny run directories for the inference CLIs' tests, in the layout engine.pretrain writes
(config.json + model.safetensors + tokenizer.json), made here in a second."""
from __future__ import annotations

from pathlib import Path

import torch

from engine import GPT1, GPT1Config
from engine.tokenizer import BPETokenizer

TEXT = (
    "to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
    "and by opposing end them. to die, to sleep; no more; and by a sleep to say we end the "
    "heart-ache and the thousand natural shocks that flesh is heir to.\n"
)


def make_lm_run(path: Path, n_positions: int = 64, vocab_size: int = 200, seed: int = 0) -> Path:
    """A random-weight GPT1 and a BPE trained on TEXT, saved as a pretraining run."""
    tok = BPETokenizer.train(texts=[TEXT] * 4, vocab_size=vocab_size, min_frequency=1)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(path / "tokenizer.json")
    torch.manual_seed(seed)
    cfg = GPT1Config(vocab_size=tok.vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4)
    GPT1(cfg, fused=False).save_pretrained(path)
    return path
