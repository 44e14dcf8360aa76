"""`python -m engine.paper`: the paper's analyses in miniature, on the embedded data, from nothing.

    python -m engine.paper --out runs/paper            # ~28 min on 2 CPU cores (bench/results/paper-2026-12-01)
    python -m engine.paper --quick --out runs/paper-q  # ~10 min: checks everything runs (LM on the unigram plateau)
    python -m engine.paper --pretrained runs/pretrain --out runs/paper   # reuse a pretraining run

Writes into --out: ``report.md`` (the tables, the figures and a sentence per effect),
``table5.png``, ``fig2_layers.png``, ``fig2_zeroshot.png`` and ``results.json``. Every
sub-run (pretraining, each fine-tuning) has its own directory under --out; running the command
again skips finished sub-runs and resumes an interrupted one, so the whole is resumable.

What it measures (Radford et al., 2018):

* Table 5 — on each task: the full method (pretrained, auxiliary LM loss λ = 0.5), without
  pre-training (the same architecture from random weights) and without the auxiliary LM loss
  (λ = 0); dev accuracy with its standard error.
* Fig. 2 left — dev accuracy against the number of pretrained blocks transferred (0..n_layer;
  the embeddings always are).
* Fig. 2 right — zero-shot accuracy of the LM alone (engine.zeroshot) against pretraining
  updates, from the pretraining run's checkpoints.

Differences between two settings are read on the same dev examples, so their standard error is
the paired one: sd(correct_a − correct_b) / √n.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine import cli
from engine.training.launch import Recipe, RunArgs, launch

TASKS = ("shakespeare-cloze", "shakespeare-order")
# The paper's findings, each effect's direction as the report quotes it.
PAPER = {
    "pretraining": "Table 5: removing pre-training costs 14.8 points on average (74.7 → 59.9); it helps every task",
    "aux_lm": "Table 5: removing the auxiliary LM loss changes the average little (74.7 → 75.0); it helps the "
    "larger data sets (NLI, QQP) and hurts the smaller ones",
    "layers": "Fig. 2 left: accuracy rises with each layer transferred (up to 9% per layer on MultiNLI)",
    "zeroshot": "Fig. 2 right: zero-shot performance rises steadily with pretraining updates",
}


# Table 5: the auxiliary LM loss helps MNLI, QNLI, QQP, SNLI (108k-550k training examples), not
# CoLA, SST-2, MRPC, RTE (2.5k-67k); an embedded task is judged by its side of this line.
AUX_LM_HELPS_FROM = 100_000


def aux_lm_expected_sign(n_train: int) -> int:
    """+1 (the paper: the auxiliary LM loss helps) for large training sets, -1 (it does not) for small."""
    return +1 if n_train >= AUX_LM_HELPS_FROM else -1


@dataclass(frozen=True)
class Budget:
    """How much compute each part gets."""

    pretrain_steps: int | None  # None: the pretraining CLI's device default
    checkpoint_every: int | None
    finetune_steps: int
    preset: str | None = None  # pretraining preset (None: the CLI's default)
    finetune_lr: float | None = None  # peak fine-tuning rate (None: the fine-tuning CLI's default)


# Ten fine-tunings share the budget, so each is short and takes a larger peak rate
# (measured: bench/results/cpu-defaults.md).
BUDGETS = {
    "default": Budget(pretrain_steps=None, checkpoint_every=100, finetune_steps=120, finetune_lr=3e-4),
    "quick": Budget(pretrain_steps=300, checkpoint_every=60, finetune_steps=30, finetune_lr=3e-4),
}


# ---- sub-runs ----------------------------------------------------------------------------------


def _launch(recipe: Recipe, args: RunArgs, what: str) -> None:
    """Runs one sub-run through the training programs' launch; one that ends early stops the whole."""
    code = launch(recipe, args)
    if code != 0:
        raise cli.UserError(f"{what} ended early (exit {code}); run the same command again to resume it")


def _pretraining_done(out: Path) -> bool:
    """The pretraining program logs final_val_loss only once the run finished (an interrupted
    run also leaves weights behind)."""
    log = out / "metrics.jsonl"
    return log.is_file() and '"final_val_loss"' in log.read_text()


def _resume_or_start(out: Path, done: bool, quiet: bool = False) -> RunArgs | None:
    """None when the sub-run finished; --resume when it has a checkpoint; else a new run in
    `out` (replacing what an unfinished start left there)."""
    if done:
        return None
    from engine.training.checkpoint import latest_checkpoint

    if latest_checkpoint(out) is not None:
        return RunArgs(resume=str(out), quiet=quiet)
    return RunArgs(out=str(out), overwrite=True, quiet=quiet)


@dataclass
class Study:
    """The sub-runs of one report, each in its own directory under `out`: rerunning skips the
    finished ones and resumes an interrupted one."""

    out: Path
    budget: Budget
    fused: bool
    say: Callable[[str], None] = print

    def pretrain(self) -> Path:
        from engine.pretrain import Pretraining

        out = self.out / "pretrain"
        args = _resume_or_start(out, _pretraining_done(out))
        if args is None:
            return out
        self.say(f"pretraining → {out}")
        given, given_train = {}, {"fused": self.fused}
        if args.resume is None:  # a new run: the budget's settings (None: the program's default)
            b = self.budget
            given = _set(preset=b.preset)
            given_train |= _set(keep_checkpoints=1000, max_steps=b.pretrain_steps, checkpoint_every=b.checkpoint_every)
        _launch(Pretraining.resolve(given, given_train, args), args, "pretraining")
        return out

    def finetune(self, task: str, variant: str, pretrained: Path, **changes: Any) -> dict[str, Any]:
        """Runs (or resumes, or reuses) one fine-tuning of `task` from `pretrained` with `changes`
        to its FinetuneConfig; returns its metrics.json and dev correctness."""
        from engine.finetune import Finetuning

        out = self.out / task / variant
        args = _resume_or_start(out, (out / "metrics.json").is_file(), quiet=True)
        if args is not None:
            shown = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in changes.items())
            self.say(f"fine-tuning {task} {shown or '(full method)'} → {out}")
            given, given_train = {}, {"fused": self.fused}
            if args.resume is None:
                steps = self.budget.finetune_steps
                given = {"task": task, "init": str(pretrained), **changes}
                given_train |= _set(max_steps=steps, eval_every=steps, lr=self.budget.finetune_lr)
            _launch(Finetuning.resolve(given, given_train, args), args, f"fine-tuning {task}")
        metrics = json.loads((out / "metrics.json").read_text())
        metrics["correct"] = dev_correct(out / "dev_predictions.tsv")
        return metrics


def _set(**settings: Any) -> dict[str, Any]:
    """The settings that are given (not None)."""
    return {k: v for k, v in settings.items() if v is not None}


def dev_correct(path: Path) -> list[int]:
    """1/0 per dev example, in file order, from fine-tuning's dev_predictions.tsv."""
    rows = path.read_text(encoding="utf-8").splitlines()[1:]
    return [int(r.split("\t")[1] == r.split("\t")[2]) for r in rows if r]


# ---- statistics -----------------------------------------------------------------------------------


def standard_error(correct: list[int]) -> float:
    n = len(correct)
    p = sum(correct) / n
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def paired_difference(a: list[int], b: list[int]) -> tuple[float, float]:
    """(mean of a − b, its standard error) on the same examples."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_difference needs two equally long, non-empty lists")
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1)
    return mean, math.sqrt(var / len(d))


def effect_sentence(name: str, diff: float, se: float, expected_sign: int) -> str:
    """One sentence: the effect in points, how many standard errors, and whether its
    direction is the paper's."""
    z = diff / se if se > 0 else math.inf * (1 if diff > 0 else -1 if diff < 0 else 0)
    same = (diff > 0) == (expected_sign > 0) if diff != 0 else False
    strength = "significant (|z| ≥ 2)" if abs(z) >= 2 else "within noise (|z| < 2)"
    return (
        f"{name}: {100 * diff:+.1f} points ({z:+.1f} SE, {strength}); "
        f"direction {'matches' if same else 'does not match'} the paper's"
    )


# ---- the whole ---------------------------------------------------------------------------------------


def run(study: Study, pretrained: Path | None, tasks: tuple[str, ...]) -> dict[str, Any]:
    """Every sub-run of the report (pretraining unless `pretrained` is given), then report.md."""
    study.out.mkdir(parents=True, exist_ok=True)
    pre = pretrained or study.pretrain()
    from engine.model.config import GPT1Config

    n_layer = GPT1Config.from_json_file(pre / "config.json").n_layer
    table: dict[str, dict[str, Any]] = {}
    for task in tasks:
        table[task] = {
            "full": study.finetune(task, "full", pre),
            "no_pretraining": study.finetune(task, "no-pretraining", pre, init="none", arch=str(pre)),
            "no_aux_lm": study.finetune(task, "no-aux-lm", pre, lm_coef=0.0),
        }
    layers_task = tasks[0]
    layers = {k: study.finetune(layers_task, f"transfer-{k}", pre, n_transfer=k) for k in range(n_layer)}
    layers[n_layer] = table[layers_task]["full"]
    zs = zeroshot_curve(pre, tasks, study.fused, study.say)
    results = summarise(table, layers, zs, layers_task, pre, study.budget)
    write_report(study.out, results)
    return results


def zeroshot_curve(pre: Path, tasks: tuple[str, ...], fused: bool, say: Callable[[str], None]) -> list[dict[str, Any]]:
    from engine import zeroshot
    from engine.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(pre)
    import torch

    device = torch.device("cpu")
    curve = []
    points = zeroshot.checkpoints_of(pre) or [(None, pre)]
    say(f"zero-shot on {len(points)} pretraining checkpoint(s)")
    for step, path in points:
        model = zeroshot.load_model(path, fused, device)
        curve.append({"step": step, **{t: zeroshot.evaluate(model, tokenizer, t).as_dict() for t in tasks}})
    return curve


def summarise(
    table: dict[str, dict[str, Any]],
    layers: dict[int, dict[str, Any]],
    zs: list[dict[str, Any]],
    layers_task: str,
    pre: Path,
    budget: Budget,
) -> dict[str, Any]:
    def acc(m: dict[str, Any]) -> dict[str, float]:
        return {
            "accuracy": sum(m["correct"]) / len(m["correct"]),
            "se": standard_error(m["correct"]),
            "n": len(m["correct"]),
        }

    t5 = {task: {k: acc(m) for k, m in rows.items()} for task, rows in table.items()}
    effects = []
    for task, rows in table.items():
        d, se = paired_difference(rows["full"]["correct"], rows["no_pretraining"]["correct"])
        effects.append(
            {
                "task": task,
                "effect": "pretraining",
                "diff": d,
                "se": se,
                "sentence": effect_sentence(f"{task}, pre-training (full − no pre-training)", d, se, +1),
            }
        )
        d, se = paired_difference(rows["full"]["correct"], rows["no_aux_lm"]["correct"])
        n_train = rows["full"]["n_train"]
        effects.append(
            {
                "task": task,
                "effect": "aux_lm",
                "diff": d,
                "se": se,
                "n_train": n_train,
                "sentence": effect_sentence(
                    f"{task}, auxiliary LM loss (full − no aux LM, {n_train} training examples: "
                    f"{'large' if aux_lm_expected_sign(n_train) > 0 else 'small'} by Table 5's line)",
                    d,
                    se,
                    aux_lm_expected_sign(n_train),
                ),
            }
        )
    ks = sorted(layers)
    d, se = paired_difference(layers[ks[-1]]["correct"], layers[ks[0]]["correct"])
    effects.append(
        {
            "task": layers_task,
            "effect": "layers",
            "diff": d,
            "se": se,
            "sentence": effect_sentence(f"{layers_task}, all {ks[-1]} layers vs none transferred", d, se, +1),
        }
    )
    for task in table:
        pts = [r[task] for r in zs]
        first, last = pts[0], pts[-1]
        se = math.sqrt(
            first["value"] * (1 - first["value"]) / first["n"] + last["value"] * (1 - last["value"]) / last["n"]
        )
        diff = last["value"] - first["value"]
        effects.append(
            {
                "task": task,
                "effect": "zeroshot",
                "diff": diff,
                "se": se,
                "sentence": effect_sentence(f"{task}, zero-shot last vs first checkpoint", diff, se, +1),
            }
        )
    return {
        "pretrained": str(pre),
        "budget": budget.__dict__,
        "table5": t5,
        "layers": {layers_task: {str(k): acc(m) for k, m in layers.items()}},
        "zeroshot": zs,
        "effects": effects,
        "paper": PAPER,
    }


# ---- report ---------------------------------------------------------------------------------------


def write_report(out: Path, results: dict[str, Any]) -> None:
    from engine.fileio import atomic_write_text

    _plot_table5(results, out / "table5.png")
    _plot_layers(results, out / "fig2_layers.png")
    _plot_zeroshot(results, out / "fig2_zeroshot.png")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "report.md", report_markdown(results))


def report_markdown(results: dict[str, Any]) -> str:
    t5 = results["table5"]
    lines = [
        "# GPT-1's analyses in miniature",
        "",
        f"Pretrained run: `{results['pretrained']}`; budget {results['budget']}. Dev accuracy ± one standard error.",
        "",
        "## Table 5 (ablations)",
        "",
        "| task | full method | w/o pre-training | w/o aux LM |",
        "|---|---|---|---|",
    ]
    for task, rows in t5.items():
        cells = [
            f"{100 * rows[k]['accuracy']:.1f} ± {100 * rows[k]['se']:.1f}"
            for k in ("full", "no_pretraining", "no_aux_lm")
        ]
        lines.append(f"| {task} (n={rows['full']['n']}) | " + " | ".join(cells) + " |")
    ((task, layers),) = results["layers"].items()
    lines += [
        "",
        "![Table 5](table5.png)",
        "",
        f"## Fig. 2 left: layers transferred ({task})",
        "",
        "| blocks transferred | " + " | ".join(layers) + " |",
        "|---|" + "---|" * len(layers),
        "| dev accuracy | "
        + " | ".join(f"{100 * v['accuracy']:.1f} ± {100 * v['se']:.1f}" for v in layers.values())
        + " |",
        "",
        "![layers](fig2_layers.png)",
        "",
        "## Fig. 2 right: zero-shot vs pretraining updates",
        "",
    ]
    tasks = [k for k in results["zeroshot"][0] if k != "step"]
    lines += ["| update | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for r in results["zeroshot"]:
        lines.append(f"| {r['step']} | " + " | ".join(f"{100 * r[t]['value']:.1f}" for t in tasks) + " |")
    lines += ["", "![zero-shot](fig2_zeroshot.png)", "", "## What it says", ""]
    lines += [f"- {e['sentence']}." for e in results["effects"]]
    lines += ["", "The paper:", ""] + [f"- {v}." for v in results["paper"].values()]
    return "\n".join(lines) + "\n"


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(7, 4.5))


def _save(plt: Any, fig: Any, path: Path) -> None:
    from engine.fileio import atomic_write

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _plot_table5(results: dict[str, Any], path: Path) -> None:
    plt, fig, ax = _figure()
    names = ("full", "no_pretraining", "no_aux_lm")
    tasks = list(results["table5"])
    width = 0.8 / len(names)
    for i, k in enumerate(names):
        rows = [results["table5"][t][k] for t in tasks]
        ax.bar(
            [j + i * width for j in range(len(tasks))],
            [100 * r["accuracy"] for r in rows],
            width,
            yerr=[100 * r["se"] for r in rows],
            label=k.replace("_", " "),
            capsize=3,
        )
    ax.set_xticks([j + width for j in range(len(tasks))], tasks)
    ax.set_ylabel("dev accuracy (%)")
    ax.legend()
    _save(plt, fig, path)


def _plot_layers(results: dict[str, Any], path: Path) -> None:
    plt, fig, ax = _figure()
    ((task, layers),) = results["layers"].items()
    ks = [int(k) for k in layers]
    ax.errorbar(
        ks,
        [100 * v["accuracy"] for v in layers.values()],
        yerr=[100 * v["se"] for v in layers.values()],
        marker="o",
        capsize=3,
    )
    ax.set_xlabel("pretrained blocks transferred")
    ax.set_ylabel(f"{task} dev accuracy (%)")
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def _plot_zeroshot(results: dict[str, Any], path: Path) -> None:
    plt, fig, ax = _figure()
    zs = results["zeroshot"]
    for t in (k for k in zs[0] if k != "step"):
        ax.plot([r["step"] or 0 for r in zs], [100 * r[t]["value"] for r in zs], marker="o", label=t)
        ax.axhline(100 * zs[0][t]["chance"], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("pretraining update")
    ax.set_ylabel("zero-shot accuracy (%) (dotted: chance)")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


# ---- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m engine.paper", description="GPT-1's Table 5 and Fig. 2 in miniature, on the embedded data."
    )
    p.add_argument(
        "--out",
        default="runs/paper",
        help="where the sub-runs, report.md, figures and results.json go (default: runs/paper)",
    )
    p.add_argument("--quick", action="store_true", help="a smaller budget (~10 min on 2 CPU cores)")
    p.add_argument("--pretrained", default=None, help="reuse this pretraining run instead of making one under --out")
    p.add_argument(
        "--tasks", nargs="+", default=list(TASKS), help=f"embedded multiple-choice tasks (default: {' '.join(TASKS)})"
    )
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True, help="fused kernels (default: on)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the budget's pretraining updates")
    p.add_argument("--finetune-steps", type=int, default=None, help="override the budget's updates per fine-tuning")
    p.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        help=f"override the budget's peak fine-tuning rate (default: {BUDGETS['default'].finetune_lr})",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="override: pretraining checkpoints (zero-shot curve points) every N updates",
    )
    p.add_argument("--preset", default=None, help="pretraining preset (default: the pretraining CLI's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.data.tasks import get_task

    for t in args.tasks:
        task = get_task(t)
        if not (task.embedded and task.kind == "multiple_choice"):
            raise ValueError(f"--tasks takes embedded multiple-choice tasks, got {t!r}")
    for name in ("pretrain_steps", "finetune_steps", "checkpoint_every", "finetune_lr"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")
    base = BUDGETS["quick" if args.quick else "default"]
    budget = Budget(
        pretrain_steps=args.pretrain_steps or base.pretrain_steps,
        checkpoint_every=args.checkpoint_every or base.checkpoint_every,
        finetune_steps=args.finetune_steps or base.finetune_steps,
        preset=args.preset,
        finetune_lr=args.finetune_lr or base.finetune_lr,
    )
    pre = Path(args.pretrained) if args.pretrained else None
    if pre is not None and not (pre / "config.json").is_file():
        raise FileNotFoundError(f"--pretrained {pre}: no config.json + model.safetensors there")
    out = Path(args.out)
    study = Study(out, budget, args.fused, say=lambda m: print(m, flush=True))
    results = run(study, pre, tuple(args.tasks))
    print(report_markdown(results))
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_cli(main))
