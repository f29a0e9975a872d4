"""Dataset statistics for normalisation: mean and std of log-mel values over random training crops."""
from __future__ import annotations

from typing import Callable, Tuple

import numpy as np
from tqdm import tqdm

from .dataset import LogMelSource, random_crop
from .sources import DataError


def compute_norm_stats(source: LogMelSource, frames: int, n_items: int = 10000, seed: int = 0,
                       progress: bool = False, crop: Callable = random_crop) -> Tuple[float, float]:
    """Like the original: one random crop from each of up to n_items random items; float64 accumulation.

    `crop` must be the crop training uses: `random_crop` for training data, `noise.tile_crop` for background
    noise (short noise clips are repeated, so their statistics must be too, as the original computes them).
    """
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(source), size=min(n_items, len(source)), replace=False)
    total = total_sq = count = 0.0
    for i in tqdm(picks, desc="norm stats", disable=not progress):
        try:
            x = crop(source.load(int(i)), frames, rng).astype(np.float64)
        except Exception:  # bad items are reported by the training data checks, not here
            continue
        if not np.isfinite(x).all():
            continue
        total, total_sq, count = total + x.sum(), total_sq + np.square(x).sum(), count + x.size
    if count == 0:
        raise DataError("no readable item to compute statistics from")
    mean = total / count
    return float(mean), float(np.sqrt(max(total_sq / count - mean**2, 0.0)))
