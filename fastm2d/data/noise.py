"""Background-noise stream for M2D-X denoising: a second source drawn alongside the training data.

The k-th training sample of the run (counted over all epochs) gets noise item `NoisePicker.pick(k)`: the noise
list is reshuffled every time it is exhausted, independently of the main order, and the choice is a pure
function of (seed, k), so it survives workers and resumes. Clips shorter than the crop are tiled, not padded:
silence is not background noise. The mix itself runs on the device (`fastm2d.kernels.noise_mix`).
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Tuple

import numpy as np

from .sources import DataError

log = logging.getLogger("fastm2d.data")


class NoisePicker:
    def __init__(self, n_items: int, seed: int):
        if n_items < 1:
            raise ValueError("the background-noise source has no usable items")
        self.n_items, self.seed = n_items, seed

    @lru_cache(maxsize=4)
    def _order(self, round_: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0x4E015E, round_]).permutation(self.n_items)

    def pick(self, k: int) -> Tuple[int, int]:
        """-> (noise item, crop seed) for the k-th training sample of the run."""
        round_, pos = divmod(int(k), self.n_items)
        return int(self._order(round_)[pos]), int(np.random.default_rng([self.seed, 0xC0, k]).integers(2**62))


def tile_crop(lms: np.ndarray, frames: int, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """(F, T) -> (F, frames): a random window of the clip repeated along time as often as needed."""
    t = lms.shape[-1]
    if t < frames:
        lms = np.tile(np.asarray(lms), (1, -(-frames // t) + 1))
        t = lms.shape[-1]
    start = int(rng.integers(0, t - frames + 1))
    return np.ascontiguousarray(lms[:, start:start + frames], dtype=dtype)


class BackgroundCrops:
    """Training sample k -> the tiled crop (F, frames) of its background item, `NoisePicker.pick(k)`; an item
    holding NaN / inf is logged and another draw taken (a run is never stopped by one noise clip)."""

    MAX_SUBSTITUTES = 16

    def __init__(self, source, picker: NoisePicker, frames: int, dtype=np.float32):
        self.source, self.picker, self.frames, self.dtype = source, picker, frames, dtype

    def __call__(self, number: int) -> np.ndarray:
        for attempt in range(self.MAX_SUBSTITUTES):
            j, seed = self.picker.pick(number + attempt * 7919)
            lms = self.source.load(j)
            if np.isfinite(lms).all():
                return tile_crop(lms, self.frames, np.random.default_rng(seed), self.dtype)
            log.warning("skipping bad background item: %s: NaN or infinite values", self.source.names[j])
        raise DataError(f"{self.MAX_SUBSTITUTES} unusable background items in a row")
