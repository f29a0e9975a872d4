"""Data-path throughput cases, shared by bench_data.py and the device suite.

Each case builds its input from procedurally generated 10 s WAV clips, so the figures need no data set:
the reference loader (decode + log-mel per item), the shard loader (memory-mapped fp16 crops), the DALI
pipeline (CPU or GPU) and `fastm2d prepare`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader


def make_clips(folder: Path, n: int, seconds: float = 10.0, sample_rate: int = 16000) -> list:
    import soundfile as sf

    from fastm2d.data import synth_clip

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        path = folder / f"clip{i:05d}.wav"
        if not path.exists():
            sf.write(str(path), synth_clip(7, i, seconds, sample_rate), sample_rate, subtype="PCM_16")
        files.append(path)
    return files


def loader_rate(dataset, batch: int, workers: int, batches: int, pin: bool = False) -> float:
    """Items per second through a DataLoader with the training sampler, after one warm-up batch."""
    from fastm2d.data import EpochSampler

    sampler = EpochSampler(len(dataset), batch, seed=0, min_epoch_items=batch * (batches + 1))
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                        pin_memory=pin, persistent_workers=False)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def reference_loader_rate(files, workers: int, batch: int = 16, batches: int = 8) -> float:
    from fastm2d.data import CropDataset, LogMelSource
    return loader_rate(CropDataset(LogMelSource(files), 608), batch, workers, batches)


def shard_loader_rate(store_dir, workers: int, batch: int = 256, batches: int = 20) -> float:
    from fastm2d.data import CropDataset, LogMelStore
    return loader_rate(CropDataset(LogMelStore(store_dir), 608), batch, workers, batches, pin=torch.cuda.is_available())


def dali_rate(files, device: torch.device, threads: int, batch: int = 16, epochs: int = 2) -> float:
    from fastm2d.data.dali import DaliLogMelLoader
    loader = DaliLogMelLoader(files, batch, device, num_threads=threads)
    n = 0
    list(loader)  # warm-up epoch
    t0 = time.perf_counter()
    for _ in range(epochs):
        for lms in loader:
            n += lms.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def prepare_rate(files_dir, out_dir, workers: int) -> dict:
    from fastm2d.data.prepare import prepare
    return prepare(str(files_dir), out_dir, workers=workers, files_per_shard=max(1, len(os.listdir(files_dir)) // (2 * workers)),
                   stats_items=64, progress=False)


def vit_base_weights(folder: Path) -> Path:
    """A ViT-B 80x608 16x16 encoder with random weights, in the original's encoder-only layout and naming."""
    from fastm2d.config import ModelConfig
    from fastm2d.model import ViTEncoder
    path = Path(folder) / "m2d_vit_base-80x608p16x16-000000_enconly" / "checkpoint-0.pth"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ViTEncoder(ModelConfig(size="base").resolved()).state_dict(), path)
    return path


def embed_rate(files, device: torch.device, out: Path, batch: int = 16, workers: int = 2) -> float:
    """Clips/s of `embed_corpus` (decode in workers, batches of one length, bf16 on CUDA) with a ViT-B."""
    from fastm2d.transfer.embed_corpus import embed_corpus
    from fastm2d.transfer.runtime import load_encoder
    runtime = load_encoder(vit_base_weights(out), device=device)
    return embed_corpus(runtime, [str(f) for f in files], Path(out) / "feats", batch_size=batch, workers=workers,
                        progress=False)["clips_per_s"]


def streamed_shard_rate(spec: str, workers: int, batch: int = 16, batches: int = 8) -> float:
    """Crops per second from tar shards (a local path or an http:// URL pattern), as the trainer streams them."""
    from fastm2d.data.shards import ShardBatches, ShardCrops, ShardSource
    from fastm2d.frontend import pad_samples
    source = ShardSource(spec, 16000, 608, pad_samples(16000, 608), stats_items=1)
    it = iter(ShardBatches(ShardCrops(source, 0, 0, 0, 1, batches + 1, batch), workers))
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)
