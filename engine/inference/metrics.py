"""The paper's task metrics, as plain functions of predictions and labels (Python sequences).

accuracy   fraction correct
f1         binary F1 of the positive class (1): 2·TP / (2·TP + FP + FN)   (MRPC, QQP)
matthews   (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), 0 when a factor is 0 (CoLA)
pearson    linear correlation of scores                               (STS-B)
spearman   Pearson correlation of the ranks, ties given their average rank (STS-B)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence


def _check(pred: Sequence, gold: Sequence) -> None:
    if len(pred) != len(gold):
        raise ValueError(f"predictions ({len(pred)}) and labels ({len(gold)}) differ in length")
    if not gold:
        raise ValueError("no examples to score")


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    _check(pred, gold)
    return sum(int(p) == int(g) for p, g in zip(pred, gold)) / len(gold)


def _confusion(pred: Sequence[int], gold: Sequence[int]) -> tuple[int, int, int, int]:
    _check(pred, gold)
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    if tp + tn + fp + fn != len(gold):
        raise ValueError("f1 and matthews need binary labels and predictions (0 or 1)")
    return tp, tn, fp, fn


def f1(pred: Sequence[int], gold: Sequence[int]) -> float:
    tp, _, fp, fn = _confusion([int(p) for p in pred], [int(g) for g in gold])
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews(pred: Sequence[int], gold: Sequence[int]) -> float:
    tp, tn, fp, fn = _confusion([int(p) for p in pred], [int(g) for g in gold])
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / math.sqrt(denom) if denom else 0.0


def pearson(pred: Sequence[float], gold: Sequence[float]) -> float:
    _check(pred, gold)
    n = len(gold)
    mp, mg = sum(pred) / n, sum(gold) / n
    cov = sum((p - mp) * (g - mg) for p, g in zip(pred, gold))
    vp = sum((p - mp) ** 2 for p in pred)
    vg = sum((g - mg) ** 2 for g in gold)
    return cov / math.sqrt(vp * vg) if vp > 0 and vg > 0 else 0.0


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(pred: Sequence[float], gold: Sequence[float]) -> float:
    _check(pred, gold)
    return pearson(ranks(pred), ranks(gold))


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def compute(names: Sequence[str], pred: Sequence, gold: Sequence) -> dict[str, float]:
    """{name: value} for each metric name (see METRICS)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected names from {sorted(METRICS)}")
    return {n: METRICS[n](pred, gold) for n in names}
