"""Task metrics against values worked out by hand (each computation written beside it)."""

import math

import pytest

from engine.inference.metrics import (
    accuracy,
    compute,
    f1,
    matthews,
    pearson,
    ranks,
    spearman,
)

PRED = [1, 1, 0, 1, 0, 0, 1, 0]
GOLD = [1, 0, 0, 1, 1, 0, 1, 0]
# TP: idx 0, 3, 6 = 3; TN: idx 2, 5, 7 = 3; FP: idx 1 = 1; FN: idx 4 = 1


def test_accuracy():
    assert accuracy(PRED, GOLD) == 6 / 8
    assert accuracy([2, 0, 1], [2, 1, 1]) == 2 / 3  # multi-class


def test_f1():
    assert f1(PRED, GOLD) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 0.75
    assert f1([0, 0], [0, 0]) == 0.0  # no positives anywhere
    assert f1([1, 0, 0], [1, 1, 0]) == pytest.approx(2 / 3)  # TP 1, FN 1: 2/(2+1)


def test_matthews():
    assert matthews(PRED, GOLD) == pytest.approx((3 * 3 - 1 * 1) / math.sqrt(4 * 4 * 4 * 4))  # 0.5
    assert matthews([1, 1, 1], [1, 0, 1]) == 0.0  # a constant prediction: a zero factor
    assert matthews([0, 1], [1, 0]) == pytest.approx(-1.0)
    # TP 2, TN 1, FP 1, FN 0: (2 - 0) / sqrt(3 * 2 * 2 * 1)
    assert matthews([1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(2 / math.sqrt(12))
    with pytest.raises(ValueError, match="binary"):
        matthews([2, 0], [1, 0])


def test_pearson():
    # x = 1,2,3,4 (mean 2.5), y = 2,4,5,9 (mean 5): cov = (-1.5)(-3)+(-0.5)(-1)+(0.5)(0)+(1.5)(4) = 11
    # var x = 5, var y = 9+1+0+16 = 26
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(5 * 26))
    assert pearson([1, 2, 3], [6, 4, 2]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # no variance


def test_spearman_with_ties():
    assert ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    # ranks x = 1,2,3,4; ranks y of [1, 3, 3, 2] = 1, 3.5, 3.5, 2 (mean 2.5)
    # cov = (-1.5)(-1.5) + (-0.5)(1) + (0.5)(1) + (1.5)(-0.5) = 1.5; var x = 5; var y = 2.25+1+1+0.25 = 4.5
    assert spearman([1, 2, 3, 4], [1, 3, 3, 2]) == pytest.approx(1.5 / math.sqrt(5 * 4.5))
    assert spearman([1, 5, 100], [0.1, 0.2, 0.3]) == pytest.approx(1.0)  # monotone, not linear


def test_compute_and_errors():
    assert compute(["f1", "accuracy"], PRED, GOLD) == {"f1": pytest.approx(0.75), "accuracy": 0.75}
    with pytest.raises(ValueError, match="unknown metric"):
        compute(["bleu"], PRED, GOLD)
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([1], [1, 0])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])
