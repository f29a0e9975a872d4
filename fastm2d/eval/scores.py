"""Scores of the linear-evaluation protocol: accuracy, mean average precision (scikit-learn's, the field's
definition) and the 95 % confidence interval over seeds (Student's t from SciPy, as a small sample of runs
calls for)."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np


def accuracy(scores: np.ndarray, onehot: np.ndarray) -> float:
    return float((scores.argmax(1) == onehot.argmax(1)).mean())


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one class, sklearn.metrics.average_precision_score: tied scores form one threshold (no dependence
    on the items' order); NaN for a class without positives."""
    from sklearn.metrics import average_precision_score
    hits = np.asarray(positive) > 0
    if not hits.any():
        return float("nan")
    return float(average_precision_score(hits, scores))


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """mAP over the classes that have a positive (classes absent from the split are left out)."""
    aps = [average_precision(scores[:, c], labels[:, c]) for c in range(labels.shape[1])]
    return float(np.nanmean(aps))


def confidence_interval(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, half-width of the 95 % interval) over runs; half-width 0 for a single run."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), 0.0
    from scipy.stats import t as student_t
    t = float(student_t.ppf(0.975, len(v) - 1))
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(len(v)))
