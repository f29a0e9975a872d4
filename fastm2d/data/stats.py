"""Dataset statistics for normalisation: mean and std of log-mel values over random training crops, computed once
per data set and basis (a run's, a store's, `fastm2d stats`); their file schema is norm_stats_file.py."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from ..config import Config, is_shard_spec
from ..distributed import barrier, dist_from_env
from .dataset import LogMelSource, random_crop
from .norm_stats_file import mean_std, read_norm_stats, write_norm_stats
from .sources import DataError, list_digest

log = logging.getLogger("fastm2d.data")


def compute_norm_stats(source: LogMelSource, frames: int, n_items: int = 10000, seed: int = 0,
                       progress: bool = False, crop: Callable = random_crop) -> Tuple[float, float]:
    """Like the original: one random crop from each of up to n_items random items; float64 accumulation.

    `crop` must be the crop training uses: `random_crop` for training data, `noise.tile_crop` for background
    noise (short noise clips are repeated, so their statistics must be too, as the original computes them).
    """
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(source), size=min(n_items, len(source)), replace=False)

    def crops():
        for i in tqdm(picks, desc="norm stats", disable=not progress):
            try:
                yield crop(source.load(int(i)), frames, rng)
            except Exception:  # bad items are reported by the training data checks, not here
                continue
    return mean_std(crops(), "no readable item to compute statistics from")


def stats_basis(source, config: Config, n_items: int, crop) -> str:
    """A digest of what statistics depend on: the items, the crop and its short-clip rule, the draw."""
    return list_digest([list_digest(source.names), json.dumps(
        [config.model.input_size, config.data.sample_rate, config.data.repeat_short,
         getattr(crop, "__name__", "crop"), n_items, config.train.seed])])


def run_norm_stats(source, config: Config, configured: Optional[List[float]], path: Path,
                   crop: Callable = random_crop) -> List[float]:
    """A run's statistics: the configured ones, else the run folder's file when it was computed from the same
    basis, else a prepared store's, else computed once. Rank 0 computes and saves; the other ranks read its file."""
    if configured is not None:
        return list(configured)
    if dist_from_env().rank != 0:
        barrier()
        return read_norm_stats(path)[0]
    stats = _run_norm_stats_main(source, config, Path(path), crop)
    barrier()
    return stats


def _run_norm_stats_main(source, config: Config, path: Path, crop) -> List[float]:
    n = config.data.stats_items
    # What the statistics are computed from: a file left by an earlier run on other data (or crops) is not reused.
    basis = stats_basis(source, config, n, crop)
    if path.is_file():
        try:
            stats, saved = read_norm_stats(path)
            if saved.get("basis") == basis:
                return stats
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        log.warning("%s was computed from other data or settings: computing the statistics again", path)
    if getattr(source, "norm_stats", None) is not None:
        write_norm_stats(path, source.norm_stats, **{"from": str(getattr(source, "root", "")), "basis": basis})
        return list(source.norm_stats)
    stats = compute_norm_stats(source, config.model.input_size[1], n, config.train.seed,
                               progress=config.train.progress, crop=crop)
    write_norm_stats(path, stats, items=min(n, len(source)), basis=basis)
    log.info("statistics: mean %.4f std %.4f (saved to %s)", *stats, path)
    return list(stats)


def dataset_stats(spec: str, config: Config, items: int) -> Tuple[dict, list]:
    """`fastm2d stats`: the statistics of a folder / CSV / streamed shards as training would compute them (its crop
    and short-clip rule) -> (the record in the one schema, the files left out with their reasons)."""
    from .dataset import training_crop
    from .open_source import file_source
    if is_shard_spec(spec):  # streamed: the first `items` readable samples, as a run on them computes
        from .shards import open_shards
        source = open_shards(spec, config, items)
        return {"norm_stats": source.norm_stats, "items": min(items, len(source)), "skipped_files": 0}, []
    source, bad = file_source(spec, config, config.data.root, pad=not config.data.repeat_short)
    if not source.files:
        raise DataError(f"{spec}: none of its {len(bad)} files is usable (first: {bad[0]})")
    stats = compute_norm_stats(source, config.model.input_size[1], items, config.train.seed, progress=True,
                               crop=training_crop(config.data.repeat_short))
    return {"norm_stats": list(stats), "items": min(items, len(source.files)), "skipped_files": len(bad)}, bad
