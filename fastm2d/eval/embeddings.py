"""Clip embeddings of an evaluation task: the time mean of eq. 4 frame features (or of chosen layers), computed
once per (weights, task) on the device in batches (bf16 autocast on GPU) and cached as .npy."""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import atomic_file
from ..data.synthetic import synth_labelled_clip
from ..frontend import read_audio
from .tasks import EvalTask
from ..checkpoint import CheckpointError, resolve_checkpoint_file
from ..transfer.batching import batches_by_length

log = logging.getLogger("fastm2d.eval")


def weights_key(weights: str | Path, layers: Optional[Sequence[int]] = None, untrained_seed: Optional[int] = None) -> str:
    """Identifies the weights file by path, size and modification time (a re-written checkpoint is re-embedded);
    `untrained_seed`: the fresh initialisation used instead of the weights (each seed is its own baseline)."""
    try:
        p = resolve_checkpoint_file(weights)
    except CheckpointError:
        p = Path(weights)
    st = p.stat() if p.exists() else None
    raw = f"{p.resolve()}|{st.st_size if st else 0}|{st.st_mtime_ns if st else 0}|{layers}|{untrained_seed}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def load_clip(item: str, sample_rate: int, task: EvalTask) -> torch.Tensor:
    """One task item as a waveform at `sample_rate`: an audio file, or a generated synthetic clip."""
    if item.startswith("synthetic:"):
        wav, _, _ = synth_labelled_clip(task.synthetic["seed"], int(item.split(":")[1]), task.synthetic["seconds"],
                                        sample_rate)
        return torch.from_numpy(wav)
    return read_audio(item, sample_rate)


def clip_embeddings(n: int, load: Callable[[int], torch.Tensor], encode: Callable[[torch.Tensor], torch.Tensor],
                    runtime, batch_size: int = 64, workers: int = 0) -> torch.Tensor:
    """Items 0..n-1 (`load(i)`) -> (n, dim) time means of `encode`'s frame features, in item order, on the CPU.
    Items of one shape share a batch (transfer/batching.py, as embed and tag batch files), run in
    `runtime.inference()` (its device and arithmetic, no autograd)."""
    out: List[Optional[torch.Tensor]] = [None] * n
    for idx, x in batches_by_length(n, load, batch_size, workers):
        with runtime.inference():
            rows = encode(x.to(runtime.device)).float().mean(1).cpu()
        for j, row in zip(idx, rows):
            out[j] = row
    return torch.stack(out)


class _TaskClip:
    """load(i) for an evaluation task: its i-th item as a waveform at `sample_rate` (picklable for the workers)."""

    def __init__(self, task: EvalTask, sample_rate: int):
        self.task, self.sample_rate = task, sample_rate

    def __call__(self, i: int) -> torch.Tensor:
        return load_clip(self.task.items[i], self.sample_rate, self.task)


def embed_task(runtime, task: EvalTask, batch_size: int = 64, layers: Optional[Sequence[int]] = None,
               progress: bool = True, workers: int = 0) -> Tuple[np.ndarray, float]:
    """-> ((n, dim) clip embeddings, clips per second); `workers` decode the files in parallel."""
    device = next(runtime.parameters()).device
    bar = tqdm(total=len(task.items), desc=f"embed {task.name}", disable=not progress)

    def encode(x):
        feats = runtime.encode(x, runtime.sample_rate, return_layers=layers is not None)
        bar.update(len(x))
        return feats if layers is None else torch.cat([feats[i] for i in layers], dim=-1)

    t0 = time.perf_counter()
    emb = clip_embeddings(len(task.items), _TaskClip(task, runtime.sample_rate), encode, runtime, batch_size, workers)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = len(task.items) / max(time.perf_counter() - t0, 1e-9)
    return emb.numpy().astype(np.float32), rate


def cached_embeddings(runtime, task: EvalTask, cache_dir: Path, key: str, **kw) -> Tuple[np.ndarray, Optional[float]]:
    """embed_task, read from / written to `cache_dir/<weights key>-<task key>.npy`; the rate is None on a hit."""
    path = Path(cache_dir) / f"{key}-{task.key()}.npy"
    if path.is_file():
        try:
            cached = np.load(path)
            if cached.ndim == 2 and len(cached) == len(task.items) and np.isfinite(cached).all():
                return cached, None
        except (OSError, ValueError, EOFError) as e:  # torn by a kill or a full disk before writes were atomic
            log.warning("%s: unreadable cached embeddings (%s): computing them again", path, e)
        else:
            log.warning("%s: cached embeddings of shape %s do not fit the task's %d clips: computing them again",
                        path, cached.shape, len(task.items))
    emb, rate = embed_task(runtime, task, **kw)
    with atomic_file(path) as f:
        np.save(f, emb)
    log.info("%s: %d clips embedded at %.1f clips/s (cached in %s)", task.name, len(emb), rate, path)
    return emb, rate
