"""Dataset statistics for normalisation: mean and std of log-mel values over random training crops, computed once
per data set and basis (a run's, a store's, `fastm2d stats`); their file schema is norm_stats_file.py."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config, is_shard_spec
from ..distributed import barrier, dist_from_env
from ..run_folder import RunFolder
from .dataset import LogMelSource, random_crop, training_crop
from .norm_stats_file import mean_std, read_norm_stats, write_norm_stats
from .open_source import check_cache_dir, file_source
from .sources import DataError, list_digest
from .shards import open_shards

log = logging.getLogger("fastm2d.data")


def compute_norm_stats(source: LogMelSource, frames: int, n_items: int = 10000, seed: int = 0,
                       progress: bool = False, crop: Callable = random_crop, workers: int = 0) -> Tuple[float, float]:
    """Like the original: one random crop from each of up to n_items random items; float64 accumulation.

    `crop` must be the crop training uses: `random_crop` for training data, `noise.tile_crop` for background
    noise (short noise clips are repeated, so their statistics must be too, as the original computes them).
    `workers`: processes that decode the picked items (the cost: 10,000 files once took 15.5 s of a 36 s start);
    the crops are drawn here, in the picks' order, from one generator: the same statistics for any number of them.
    """
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(source), size=min(n_items, len(source)), replace=False)

    def crops():
        for lms in tqdm(_loaded(source, picks, workers), total=len(picks), desc="norm stats", disable=not progress):
            if lms is None:  # bad items are reported by the training data checks, not here
                continue
            try:
                yield crop(lms, frames, rng)
            except Exception:
                continue
    return mean_std(crops(), "no readable item to compute statistics from")


class _Loads(torch.utils.data.Dataset):
    """source.load(picks[k]) in a loader worker, None where it fails."""

    def __init__(self, source, picks):
        self.source, self.picks = source, picks

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, k: int):
        try:
            return self.source.load(int(self.picks[k]))
        except Exception:  # noqa: BLE001 - reported by the training data checks
            return None


def _as_is(x):
    return x


def _loaded(source, picks, workers: int):
    """The picked items' log-mel in the picks' order, decoded by `workers` processes (0: here)."""
    if workers <= 0:
        return (_Loads(source, picks)[k] for k in range(len(picks)))
    return iter(torch.utils.data.DataLoader(_Loads(source, picks), batch_size=None, num_workers=workers,
                                            collate_fn=_as_is))


def stats_key(source, basis: str, n_items: int, seed: int) -> str:
    """What a data set's statistics are keyed by in the shared cache: the basis (the list, crop, draw) and the
    size and modification time of each file the draw picks (a file changed since is a new key)."""
    h = hashlib.sha1(basis.encode())
    synthetic = getattr(source, "synthetic", None)
    if synthetic:  # generated clips: their generator's settings are their content
        h.update(repr(synthetic).encode())
    files = getattr(source, "files", None)
    if files is not None and not synthetic:
        picks = np.random.default_rng(seed).choice(len(source), size=min(n_items, len(source)), replace=False)
        for i in picks:
            try:
                st = os.stat(files.name(int(i)))
                h.update(f"{int(i)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{int(i)}|missing\n".encode())
    return h.hexdigest()[:16]


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
    # Once per data set, not per run folder: kept beside the list's file checks (data.check_cache), reused by every
    # run on the same list, crop and draw whose picked files are unchanged.
    key = stats_key(source, basis, n, config.train.seed)
    shared = RunFolder(check_cache_dir(config, path.parent)).dataset_stats(key)
    try:
        stats, saved = read_norm_stats(shared)
        if saved.get("key") == key:
            write_norm_stats(path, stats, **{**saved, "from": str(shared)})
            log.info("statistics: mean %.4f std %.4f (this data set's, from %s)", *stats, shared)
            return stats
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    stats = compute_norm_stats(source, config.model.input_size[1], n, config.train.seed,
                               progress=config.train.progress, crop=crop, workers=config.data.num_workers)
    write_norm_stats(path, stats, items=min(n, len(source)), basis=basis)
    try:
        write_norm_stats(shared, stats, items=min(n, len(source)), basis=basis, key=key)
    except OSError as e:  # a read-only or full cache costs the computation again next time, nothing else
        log.warning("cannot keep the statistics in %s (%s)", shared, e)
    log.info("statistics: mean %.4f std %.4f (saved to %s)", *stats, path)
    return list(stats)


def dataset_stats(spec: str, config: Config, items: int) -> Tuple[dict, list]:
    """`fastm2d stats`: the statistics of a folder / CSV / streamed shards as training would compute them (its crop
    and short-clip rule) -> (the record in the one schema, the files left out with their reasons)."""
    if is_shard_spec(spec):  # streamed: the first `items` readable samples, as a run on them computes
        source = open_shards(spec, config, items)
        return {"norm_stats": source.norm_stats, "items": min(items, len(source)), "skipped_files": 0}, []
    source, bad = file_source(spec, config, config.data.root, pad=not config.data.repeat_short)
    if not source.files:
        raise DataError(f"{spec}: none of its {len(bad)} files is usable (first: {bad[0]})")
    stats = compute_norm_stats(source, config.model.input_size[1], items, config.train.seed, progress=True,
                               crop=training_crop(config.data.repeat_short))
    return {"norm_stats": list(stats), "items": min(items, len(source.files)), "skipped_files": len(bad)}, bad
