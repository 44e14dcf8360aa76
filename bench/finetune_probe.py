"""What a pretraining run knows about a multiple-choice task, and whether the paper's head can
see it: the diagnostic behind the README's fine-tuning table.

    python bench/finetune_probe.py runs/pretrain                      # shakespeare-cloze
    python bench/finetune_probe.py runs/pretrain --task shakespeare-order

(1) zero-shot: the LM alone picks the choice whose tokens it finds most probable after the
    passage (average token log-probability; the paper's §5 heuristic). This is what pretraining
    taught, read through the LM head.
(2) linear probes on the frozen body, logistic regression fitted on train, scored on dev:
    the final state at the extract token (what the fine-tuning head reads), the final states
    averaged over the choice's tokens, and the choice's LM log-likelihood as a 1-d feature.
If (1) is high and the extract-state probe is at chance, the knowledge is there but the
fine-tuning head has to build its own route to it, through the body, within the run's updates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import GPT1, zeroshot  # noqa: E402
from engine.data.tasks import get_task  # noqa: E402
from engine.data.transforms import InputTransform, collate  # noqa: E402
from engine.model.heads import add_task_tokens  # noqa: E402
from engine.model.tokenizer import load_tokenizer  # noqa: E402


def choice_features(body: GPT1, transform: InputTransform, examples, pad: int, delim: int, batch: int = 64):
    """(features {name: (N, S, d)}, labels (N,)) for the transformed examples."""
    enc = transform(examples)
    feats: dict[str, list[torch.Tensor]] = {}
    labels = []
    for k in range(0, len(enc), batch):
        b = collate(enc[k : k + batch], pad)
        B, S, T = b.input_ids.shape
        ids = b.input_ids.reshape(B * S, T)
        out = body(ids, return_logits=True)
        logp = out.logits.float().log_softmax(-1)
        ext = b.extract.reshape(-1)
        pos = torch.arange(T)[None]
        after_delim = pos > (ids == delim).float().argmax(1, keepdim=True)
        choice = (after_delim & (pos < ext[:, None])).float()  # the choice's tokens
        token_ll = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # log p(x[t+1] | x[..t])
        h = out.hidden_states
        row = {
            "extract state (the head's input)": h[torch.arange(B * S), ext],
            "mean state over the choice": (h * choice[..., None]).sum(1) / choice.sum(1, keepdim=True),
            "choice LM log-likelihood (1-d)": (token_ll * choice[:, 1:]).sum(1, keepdim=True),
        }
        for name, v in row.items():
            feats.setdefault(name, []).append(v.view(B, S, -1))
        labels.append(b.labels)
    return {n: torch.cat(v) for n, v in feats.items()}, torch.cat(labels)


def probe(
    Xtr: torch.Tensor, ytr: torch.Tensor, Xdv: torch.Tensor, ydv: torch.Tensor, wd: float = 1e-2
) -> tuple[float, float]:
    """Logistic regression over the choices (one weight vector scores each choice)."""
    flat = Xtr.reshape(-1, Xtr.shape[-1])
    mu, sd = flat.mean(0), flat.std(0) + 1e-6
    Xtr, Xdv = (Xtr - mu) / sd, (Xdv - mu) / sd
    w = torch.zeros(Xtr.shape[-1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(Xtr @ w, ytr) + wd * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((Xtr @ w).argmax(-1) == ytr).float().mean().item(), ((Xdv @ w).argmax(-1) == ydv).float().mean().item()


def zero_shot(body: GPT1, tokenizer, examples) -> float:
    """Accuracy of picking the choice with the highest average token log-probability after the
    passage (the paper's §5 heuristic, engine.zeroshot)."""
    return zeroshot.multiple_choice(body, tokenizer, "probe", examples).value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", help="a pretraining run directory (config.json + model.safetensors + tokenizer.json)")
    p.add_argument(
        "--task", default="shakespeare-cloze", help="an embedded multiple-choice task (default: shakespeare-cloze)"
    )
    args = p.parse_args(argv)
    task = get_task(args.task)
    if task.kind != "multiple_choice" or not task.embedded:
        p.error(f"--task must be an embedded multiple-choice task, got {args.task!r}")
    run = Path(args.run)
    tokenizer = load_tokenizer(run)
    body = GPT1.from_pretrained(run, fused=False).eval()
    train, dev = task.load(None, "train")["train"], task.load(None, "dev")["dev"]
    torch.manual_seed(0)
    with torch.no_grad():
        print(f"{args.task}, {run}: {len(train)} train / {len(dev)} dev examples, chance {1 / len(dev[0].choices):.3f}")
        print(f"  zero-shot LM choice (dev)                  {zero_shot(body, tokenizer, dev):.3f}")
        add_task_tokens(body, tokenizer)
        sp = tokenizer.special_tokens()
        transform = InputTransform(tokenizer, task.kind, body.config.n_positions)
        Ftr, ytr = choice_features(body, transform, train, sp.pad, sp.delimiter)
        Fdv, ydv = choice_features(body, transform, dev, sp.pad, sp.delimiter)
    for name in Ftr:
        acc_tr, acc_dv = probe(Ftr[name], ytr, Fdv[name], ydv)
        print(f"  linear probe: {name:34s} train {acc_tr:.3f}  dev {acc_dv:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
