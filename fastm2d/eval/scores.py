"""Scores of the linear-evaluation protocol: accuracy, mean average precision, and the 95 % confidence interval
over seeds (Student's t, as a small sample of runs calls for)."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom; beyond, the normal 1.96.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def accuracy(scores: np.ndarray, onehot: np.ndarray) -> float:
    return float((scores.argmax(1) == onehot.argmax(1)).mean())


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one class: mean over the positives of the precision at their rank (ties broken by order)."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order] > 0
    if not hits.any():
        return float("nan")
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].mean())


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """mAP over the classes that have a positive (classes absent from the split are left out)."""
    aps = [average_precision(scores[:, c], labels[:, c]) for c in range(labels.shape[1])]
    return float(np.nanmean(aps))


def confidence_interval(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, half-width of the 95 % interval) over runs; half-width 0 for a single run."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), 0.0
    t = _T975[len(v) - 2] if len(v) - 1 <= len(_T975) else 1.96
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(len(v)))
