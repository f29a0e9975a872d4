"""The one JSON schema every statistics file uses (a run's norm_stats.json / noise_stats.json, a store's stats.json,
`fastm2d stats --out`): {"norm_stats": [mean, std], "items": crops used, "basis": what they were computed from,
"from": the store they were copied from, ...}; a reader needs only "norm_stats". And the sum that makes them.
A leaf of data/: stores, shards, `prepare` and the statistics of a run all read and write it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Tuple

import numpy as np

from ..atomic import write_atomic
from ..errors import DataError


def mean_std(crops: Iterable[np.ndarray], none_readable: str) -> Tuple[float, float]:
    """Mean and std over every value of the finite crops, in float64 sums; DataError(none_readable) if none."""
    total = total_sq = count = 0.0
    for x in crops:
        x = np.asarray(x, dtype=np.float64)
        if not np.isfinite(x).all():
            continue
        total, total_sq, count = total + x.sum(), total_sq + np.square(x).sum(), count + x.size
    if count == 0:
        raise DataError(none_readable)
    mean = total / count
    return float(mean), float(np.sqrt(max(total_sq / count - mean**2, 0.0)))


def write_norm_stats(path: Path, stats, **about) -> None:
    """The statistics file, in the one schema (about: items, basis, from, skipped_files ...)."""
    write_atomic(path, json.dumps({"norm_stats": [float(v) for v in stats], **about}))


def read_norm_stats(path: Path) -> Tuple[List[float], dict]:
    """-> ([mean, std], the whole saved record); OSError / ValueError / KeyError when unreadable."""
    saved = json.loads(Path(path).read_text())
    return [float(v) for v in saved["norm_stats"]], saved
