"""What `prepare` (a store) and `prepare --format logmel-shards` share: one file's log-mel by the store's per-item
rule, the front end's record in the output, and the worker pool that makes them."""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from ..frontend import FRONTEND_PARAMS, LOG_EPS, N_MELS, AudioReadError, LogMelSpectrogram, min_real_samples
from .dataset import load_lms_file
from .sources import DataError


def frontend_record(sample_rate: int) -> dict:
    """The front end's parameters as a prepared store or log-mel shards record them (a reader checks its own)."""
    if sample_rate not in FRONTEND_PARAMS:
        raise DataError(f"sample_rate={sample_rate}: expected one of {sorted(FRONTEND_PARAMS)}")
    return dict(FRONTEND_PARAMS[sample_rate], sample_rate=sample_rate, n_mels=N_MELS, log_eps=LOG_EPS,
                mel_scale="slaney", norm="slaney")


def in_processes(fn, tasks: List, workers: int, ordered: bool = False):
    """fn over tasks, results as they finish (`ordered`: in the tasks' order): by a pool of `workers` processes, or
    in this process for workers=0 (as data.num_workers=0), its torch threads restored after (fn pins one thread,
    right for a pool's processes)."""
    if not tasks:
        return
    if workers == 0:
        threads = torch.get_num_threads()
        try:
            yield from map(fn, tasks)
        finally:
            torch.set_num_threads(threads)
        return
    with mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(min(workers, len(tasks))) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(fn, tasks)


def item_lms(path: Path, frontend: LogMelSpectrogram, pad_to: int, min_patch_frames: int) -> Tuple[np.ndarray, int]:
    """One file -> (finite float32 (F, T) log-mel, frames of its own audio before padding), or an exception whose
    message is the reason."""
    min_samples = min_real_samples(frontend.sample_rate, min_patch_frames)
    lms, audio_frames = load_lms_file(path, frontend, pad_to, min_samples, min_patch_frames)
    lms = np.asarray(lms, dtype=np.float32)
    if not np.isfinite(lms).all():
        raise AudioReadError("log-mel contains NaN or infinite values")
    return lms, audio_frames
