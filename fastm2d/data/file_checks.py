"""The header check of every training file, once per data set: in parallel, with a progress bar, saved in the user
cache (data.check_cache) and reused by every later run on the same list, `--resume`, launcher restarts and the
other ranks of a node.

The saved result (`file_checks-<key>.npz`) is keyed by the ordered list of names and the check's
settings; inside, each file's size and modification time: a file that changed since is checked again, the rest
is read back. One sequential pass of soundfile header reads costs ~0.1 ms per file on a warm local disk and far
more on the network file systems clusters use (2 million files: minutes per rank per start). The checks run in
forked processes, one per core.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from ..run_folder import RunFolder
from ..atomic import atomic_file
from .file_list import FileList, as_file_list
from .sources import BadFile, probe_file

log = logging.getLogger("fastm2d.data")
CHUNK = 2048  # files per task: amortises the pool's overhead, keeps the bar moving
_FILES: Optional[FileList] = None  # the list being checked, inherited by forked workers (never pickled)


def default_workers() -> int:
    return os.cpu_count() or 1


def _stat(lo: int, hi: int) -> np.ndarray:
    out = np.full((hi - lo, 2), -1, dtype=np.int64)
    for j, i in enumerate(range(lo, hi)):
        try:
            st = os.stat(_FILES.name(i))
            out[j] = st.st_size, st.st_mtime_ns
        except OSError:
            pass
    return out


def _probe(idx: np.ndarray, settings: tuple) -> List[Optional[str]]:
    return [probe_file(_FILES[int(i)], *settings) for i in idx]


def _parallel(fn, tasks, workers: int, total: int, desc: str, progress: bool):
    """fn(*task) for every task, in forked processes (header parsing is Python: threads would queue on the GIL;
    processes also overlap the waits of a network file system), in order, with a progress bar."""
    import multiprocessing as mp
    with tqdm(total=total, desc=desc, unit="file", disable=not progress, dynamic_ncols=True) as bar:
        if workers <= 1 or len(tasks) <= 1 or "fork" not in mp.get_all_start_methods():
            results = []
            for t in tasks:
                results.append(fn(*t[1:]))
                bar.update(t[0])
            return results
        with mp.get_context("fork").Pool(min(workers, len(tasks))) as pool:
            results = []
            for size, result in zip((t[0] for t in tasks), pool.imap(_call, [(fn, *t[1:]) for t in tasks])):
                results.append(result)
                bar.update(size)
            return results


def _call(task):
    fn, *args = task
    return fn(*args)


def check_key(files: FileList, settings: tuple) -> str:
    return hashlib.sha1((files.digest() + json.dumps(settings)).encode()).hexdigest()[:16]


def check_files_once(paths, n_mels: int = 80, min_seconds: float = 0.0, min_frames: int = 1,
                     cache_dir: Optional[Path] = None, workers: Optional[int] = None, progress: bool = False,
                     reuse_only: bool = False) -> Tuple[FileList, List[BadFile]]:
    """-> (usable files, unusable ones with reasons), as `sources.check_files`, reusing a saved result where the
    files did not change. reuse_only: another rank of this node has just written the result: read it as it is."""
    global _FILES
    files = as_file_list(paths)
    settings = (n_mels, min_seconds, min_frames)
    workers = workers or default_workers()
    path = RunFolder(cache_dir).file_checks(check_key(files, settings)) if cache_dir is not None else None
    saved = _load(path, len(files))
    if reuse_only and saved is not None:
        reasons = saved[1]
    else:
        _FILES = files
        try:
            stats, reasons = _check(files, settings, workers, saved, progress)
        finally:
            _FILES = None
        if path is not None:
            try:
                _save(path, stats, reasons)
            except OSError as e:  # a read-only or full cache costs the checks again next time, nothing else
                log.warning("%s: file checks not saved (%s)", path, e)
    ok = np.ones(len(files), dtype=bool)
    ok[list(reasons)] = False
    return files.select(ok), [BadFile(files[i], reasons[i]) for i in sorted(reasons)]


def _check(files: FileList, settings: tuple, workers: int, saved, progress: bool):
    """-> (each file's (size, mtime_ns), {index: reason} of the unusable), probing only what changed since `saved`."""
    spans = [(min(CHUNK, len(files) - lo), lo, min(lo + CHUNK, len(files))) for lo in range(0, len(files), CHUNK)]
    stats = np.concatenate(_parallel(_stat, spans, workers, len(files), "stat", progress)) if spans \
        else np.zeros((0, 2), np.int64)
    reasons, todo = {}, np.arange(len(files))
    if saved is not None:
        old_stats, old_reasons = saved
        same = (old_stats == stats).all(axis=1) & (stats[:, 0] >= 0)
        reasons = {i: r for i, r in old_reasons.items() if same[i]}
        todo = np.flatnonzero(~same)
    chunks = [(len(c), c, settings) for c in np.array_split(todo, max(1, -(-len(todo) // CHUNK))) if len(c)]
    for (_, idx, _), found in zip(chunks, _parallel(_probe, chunks, workers, len(todo), "check files", progress)):
        reasons.update((i, r) for i, r in zip(idx.tolist(), found) if r is not None)
    return stats, reasons


def _load(path: Optional[Path], n: int):
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as z:  # numpy refuses pickled objects by default: arrays and one JSON string only
            stats = z["stats"]
            reasons = {int(k): v for k, v in json.loads(str(z["reasons"])).items()}
    except (OSError, ValueError, KeyError):
        return None  # unreadable: checked again
    if stats.shape != (n, 2) or any(not 0 <= i < n for i in reasons):
        return None
    return stats, reasons


def _save(path: Path, stats: np.ndarray, reasons: dict) -> None:
    with atomic_file(path) as f:  # a rank reading it sees the old file or the new one, never half of one
        np.savez(f, stats=stats, reasons=np.array(json.dumps({str(k): v for k, v in reasons.items()})))
