"""Deterministic, resumable epoch order: (item, crop seed, sample number) from (seed, epoch, position).

The sample number counts training samples over the whole run; the background-noise stream keys on it.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """Shuffles `n_items` each epoch (repeating a small list up to `min_epoch_items`), drops the last partial
    batch, and starts mid-epoch at `start_batch` so a resumed run continues the uninterrupted order."""

    def __init__(self, n_items: int, batch_size: int, seed: int, min_epoch_items: int = 0,
                 rank: int = 0, world_size: int = 1, weights=None):
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch_items = max(n_items, min_epoch_items)
        self.batches_per_epoch = self.epoch_items // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"{n_items} items cannot fill one batch of {batch_size} x {world_size} processes")
        self.epoch, self.start_batch = 0, 0
        # Label-balanced sampling (M2D-AS): items drawn with replacement in proportion to `weights`.
        self.p = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
        # Items found unusable while training: each is replaced by the next usable item, the same substitute the
        # dataset would read after failing on it, so knowing them changes no batch, only saves the re-reads.
        self.bad: set = set()

    def substitute(self, i: int) -> int:
        if len(self.bad) >= self.n_items:
            raise ValueError("every training item was found unusable")
        while i in self.bad:
            i = (i + 1) % self.n_items
        return i

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start_batch = epoch, batch

    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.p is not None:
            items = rng.choice(self.n_items, size=self.epoch_items, replace=True, p=self.p)
        else:
            reps = -(-self.epoch_items // self.n_items)
            items = np.concatenate([rng.permutation(self.n_items) for _ in range(reps)])[: self.epoch_items]
        seeds = rng.integers(0, 2**62, size=self.epoch_items)
        numbers = epoch * self.epoch_items + np.arange(self.epoch_items)
        return np.stack([items, seeds, numbers], axis=1)

    def __iter__(self):
        pairs = self.order(self.epoch)
        per_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            chunk = pairs[b * per_batch:(b + 1) * per_batch][self.rank::self.world_size]
            for item, seed, number in chunk:  # `bad` is read lazily: it grows while the epoch runs
                yield self.substitute(int(item)), int(seed), int(number)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
