"""Tiny run directories for the inference CLIs' tests, in the layout engine.pretrain writes
(config.json + model.safetensors + tokenizer.json), made here in a second."""

from __future__ import annotations

from pathlib import Path

import torch

from engine import GPT1, GPT1Config
from engine.model.tokenizer import BPETokenizer

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


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def make_fixture_run(path: Path, n_positions: int = 96, vocab_size: int = 400) -> Path:
    """A random-weight 2×32 GPT1 and a BPE trained on every fixture file's lines (so the GLUE-
    format fixtures tokenise without unknowns), saved as a pretraining run."""
    texts = [
        line for f in sorted(FIXTURES.rglob("*")) if f.is_file() for line in f.read_text(encoding="utf-8").split("\n")
    ]
    tok = BPETokenizer.train(texts=texts * 2, vocab_size=vocab_size)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(path / "tokenizer.json")
    torch.manual_seed(0)
    GPT1(
        GPT1Config(vocab_size=tok.vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2), fused=False
    ).save_pretrained(path)
    return path


# task name, kind and labels of each kind's fine-tuned run (the names are registered tasks)
TASKS = {
    "classification": ("sst2", ("0", "1")),
    "entailment": ("rte", ("entailment", "not_entailment")),
    "similarity": ("mrpc", ("0", "1")),
    "regression": ("stsb", ()),
    "multiple_choice": ("rocstories", ()),
}


def make_task_run(path: Path, kind: str, seed: int = 0) -> Path:
    """A fine-tuned run as engine.model.finetuned.save_finetuned writes it, with a random head
    whose bias is far from 0 (and, for regression, standardisation away from 0 / 1): every term
    of the head shows in its outputs."""
    from engine.model.finetuned import TaskMeta, save_finetuned
    from engine.model.heads import GPT1ForTask, TaskHead, add_task_tokens

    task, labels = TASKS[kind]
    tok = BPETokenizer.train(texts=[TEXT] * 4, vocab_size=200, min_frequency=1)
    torch.manual_seed(seed)
    body = GPT1(GPT1Config(vocab_size=tok.vocab_size, n_positions=48, n_embd=32, n_layer=2, n_head=4), fused=False)
    add_task_tokens(body, tok)
    head = TaskHead(kind, 32, max(1, len(labels)), pdrop=0.1)
    with torch.no_grad():
        head.linear.weight.normal_(0.0, 0.5)
        head.linear.bias.uniform_(-1.0, 1.0)
    if kind == "regression":
        head.set_target_stats(torch.tensor([0.5, 4.0, 2.5, 3.0]))
    meta = TaskMeta(task, kind, list(labels), max_len=40, metrics=["accuracy"], init="test")
    save_finetuned(GPT1ForTask(body, head), tok, meta, path)
    return path


# one example of each kind, in engine.predict's JSONL layout
EXAMPLES = {
    "classification": [
        {"text": "to be, or not to be"},
        {"text": "the slings and arrows of outrageous fortune", "id": "x"},
        {"text": "to die, to sleep; no more"},
    ],
    "entailment": [
        {"text": "to be, or not to be", "text_pair": "that is the question"},
        {"text": "to die", "text_pair": "to sleep, perchance to dream; ay, there's the rub", "label": 1},
    ],
    "similarity": [
        {"text": "to be, or not to be", "text_pair": "that is the question"},
        {"text": "a sea of troubles", "text_pair": "the thousand natural shocks"},
    ],
    "regression": [
        {"text": "to be, or not to be", "text_pair": "that is the question"},
        {"text": "a sea of troubles", "text_pair": "the thousand natural shocks"},
    ],
    "multiple_choice": [
        {"context": "to be, or not to be", "choices": ["that is the question", "a sea of troubles"]},
        {"context": ["whether 'tis nobler", "in the mind"], "choices": ["to suffer", "to die", "no more"]},
    ],
}
