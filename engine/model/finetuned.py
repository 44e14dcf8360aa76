"""A fine-tuned model on disk: body + task head + tokenizer + task.json, written whole and read
back (validated) in one place.

    run/config.json, model.safetensors   the body (Hugging Face openai-gpt layout, engine.model.hf)
    run/head.safetensors                 the task head (engine.model.heads.TaskHead)
    run/tokenizer.json                   the tokenizer, the fine-tuning tokens included
    run/task.json                        TaskMeta: the task, its kind, labels and input length

`python -m engine.finetune` writes it (save_finetuned, its best dev checkpoint); the fine-tuning
evaluation and `engine.predict` read it (load_finetuned).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from engine.fileio import atomic_write, atomic_write_text, fsync_dir, make_temp_dir
from engine.model.gpt1 import GPT1, load_pretrained
from engine.model.heads import KINDS, GPT1ForTask, TaskHead
from engine.model.tokenizer import BPETokenizer, load_tokenizer

TASK_FILE, HEAD_FILE, TOKENIZER_FILE = "task.json", "head.safetensors", "tokenizer.json"
MODEL_FILES = ("config.json", "model.safetensors", HEAD_FILE, TOKENIZER_FILE, TASK_FILE)


@dataclass
class TaskMeta:
    """task.json: what the model was fine-tuned for and how its inputs are built."""

    task: str  # the task's name (engine.data.tasks)
    kind: str  # one of engine.model.heads.KINDS
    labels: list[str]  # label names, in the head's output order (empty: choices or a score)
    max_len: int  # longest input sequence in tokens
    metrics: list[str] = field(default_factory=list)  # the task's metrics, the first one decides "best"
    lm_coef: float = 0.5  # λ of the auxiliary LM loss it was trained with
    lm_average: str = "token"  # how that LM loss averaged
    head_dropout: float = 0.1
    init: str | None = None  # where the body came from
    data_dir: str | None = None  # the task's files it was trained on
    step: int | None = None  # the update this checkpoint was saved at
    dev: dict[str, float] | None = None  # its dev scores then

    @classmethod
    def read(cls, run_dir: Path) -> TaskMeta:
        """run_dir/task.json, checked field by field (a one-line ValueError naming the file);
        keys this version does not know are ignored."""
        file = run_dir / TASK_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"{run_dir} has no {TASK_FILE}: not a fine-tuned run (make one with python -m engine.finetune)"
            )
        try:
            meta = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{file} must hold a JSON object")
        if not isinstance(meta.get("task"), str):
            raise ValueError(f"{file}: field 'task' must be a string, got {meta.get('task')!r}")
        if meta.get("kind") not in KINDS:
            raise ValueError(f"{file}: field 'kind' must be one of {KINDS}, got {meta.get('kind')!r}")
        labels = meta.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"{file}: field 'labels' must be a list of strings, got {labels!r}")
        max_len = meta.get("max_len")
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 4:
            raise ValueError(f"{file}: field 'max_len' must be an integer >= 4, got {max_len!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in known})

    def head(self, n_embd: int, initializer_range: float = 0.02) -> TaskHead:
        """A head of this task's shape (its weights: fresh; load_head fills them)."""
        return TaskHead(self.kind, n_embd, max(1, len(self.labels)), self.head_dropout, initializer_range)


def save_head(head: TaskHead, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    atomic_write(path / HEAD_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def load_head(head: TaskHead, path: Path) -> None:
    """path/head.safetensors into `head`; an unreadable or misfitting file is a one-line ValueError."""
    from safetensors.torch import load_file

    file = path / HEAD_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {HEAD_FILE} in {path}: not a fine-tuned run")
    try:
        state = load_file(str(file), device=str(head.linear.weight.device))
    except Exception as e:  # safetensors' own error type, and OSError for a truncated file
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{file} does not fit the task's head: {str(e).splitlines()[0]}") from None


def save_weights(model: GPT1ForTask, path: Path) -> None:
    """The body in the Hugging Face layout + head.safetensors, each file atomically."""
    model.body.save_pretrained(path)
    save_head(model.head, path)


def load_weights(model: GPT1ForTask, path: Path) -> None:
    """save_weights' files into `model`, whose body config must be the saved one."""
    config, state = load_pretrained(path)
    if config != model.body.config:
        raise ValueError(f"{path}: checkpoint config differs from the model's")
    model.body.load_state_dict(state)
    load_head(model.head, path)


def save_finetuned(model: GPT1ForTask, tokenizer: BPETokenizer, meta: TaskMeta, path: Path) -> None:
    """The whole directory, written to a temporary one and renamed into place (the old one is
    removed only after the new one is complete)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path)  # honours the umask, unlike mkdtemp's 0700
    try:
        save_weights(model, tmp)
        tokenizer.save(tmp / TOKENIZER_FILE)
        atomic_write_text(tmp / TASK_FILE, json.dumps(dataclasses.asdict(meta), indent=2) + "\n")
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_finetuned(src: Path, dst: Path) -> None:
    """The model's files of `src` into `dst`, each atomically (other files stay)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (src / name).is_file():
            atomic_write(dst / name, lambda tmp, f=src / name: shutil.copyfile(f, tmp))


def load_finetuned(
    path: Path, fused: bool = True, tokenizer: str | None = None
) -> tuple[GPT1ForTask, BPETokenizer, TaskMeta]:
    """(model, tokenizer, task.json) of a fine-tuned model directory, on the CPU; `tokenizer`: a
    tokenizer.json to use instead of the directory's own."""
    meta = TaskMeta.read(path)
    tok = load_tokenizer(tokenizer or path)
    if tok.token_to_id("<classify>") is None:
        raise ValueError(f"{path}: its tokenizer has no fine-tuning tokens (<start>, <delim>, <classify>, <pad>)")
    body = GPT1.from_pretrained(path, fused=fused)
    head = meta.head(body.config.n_embd)
    load_head(head, path)
    return GPT1ForTask(body, head, lm_coef=meta.lm_coef, lm_average=meta.lm_average), tok, meta
