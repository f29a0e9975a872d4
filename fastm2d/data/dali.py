"""GPU-resident raw-audio pipeline (NVIDIA DALI): decode + resample on CPU threads, then spectrogram, mel,
log, padding and random crop on the GPU, delivered as torch tensors on the device.

It computes what `fastm2d.frontend.LogMelSpectrogram` computes (tested against it with DALI's CPU operators,
device_id=None). DALI is optional: `pip install fastm2d[dali]`; without it `DaliLogMelLoader` raises a
message that says so. The trainer normalises the raw log-mel it yields, like every other loader's.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import torch

from ..frontend import FRONTEND_PARAMS, LOG_EPS, N_MELS, SILENCE_LOG, pad_samples


def dali_missing_reason() -> Optional[str]:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "NVIDIA DALI is not installed (pip install 'fastm2d[dali]', i.e. nvidia-dali-cuda130)"
    return None


def build_pipeline(files: Sequence[str], batch_size: int, sample_rate: int = 16000, crop_frames: Optional[int] = 608,
                   device_id: Optional[int] = None, num_threads: int = 4, seed: int = 42, shuffle: bool = True,
                   shard_id: int = 0, num_shards: int = 1, pad_for: Optional[int] = None, with_index: bool = False):
    """A built DALI pipeline yielding raw log-mel (B, 80, crop_frames), or full length when crop_frames is None;
    `with_index`: also each item's position in `files` (which file a rank read).

    Under several processes each rank reads its own shard of `files` (shard_id = rank, num_shards = world size):
    the shards of one epoch are disjoint and together are the list, and DALI moves every rank to the next shard at
    each epoch.

    Short clips are padded by frontend.py's rule for the crop (or for a `pad_for`-frame crop when given: the
    full-length output of a clip as a crop of that length sees it). device_id=None runs everything with DALI's
    CPU operators (tests, CPU benchmarks).
    """
    pad_for = crop_frames if pad_for is None else pad_for
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    p = FRONTEND_PARAMS[sample_rate]
    window = torch.hann_window(p["n_fft"], periodic=True).tolist()

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  exec_dynamic=True)
    def logmel():
        # The reader's labels default to each file's index in `files`.
        raw, index = fn.readers.file(files=list(files), random_shuffle=shuffle, name="reader", seed=seed,
                                     shard_id=shard_id, num_shards=num_shards, pad_last_batch=False)
        audio, _ = fn.decoders.audio(raw, sample_rate=sample_rate, downmix=True, dtype=types.FLOAT)
        # frontend.py's short-clip rule: zero-pad the waveform to the crop (a minimum: longer clips stay as they are).
        if pad_for is not None:
            audio = fn.pad(audio, axes=[0], shape=[pad_samples(sample_rate, pad_for)], fill_value=0.0)
        if device_id is not None:
            audio = audio.gpu()
        spec = fn.spectrogram(audio, nfft=p["n_fft"], window_length=p["n_fft"], window_step=p["hop_length"],
                              window_fn=window, center_windows=True, reflect_padding=True, power=2, layout="ft")
        mel = fn.mel_filter_bank(spec, sample_rate=sample_rate, nfilter=N_MELS, freq_low=p["f_min"],
                                 freq_high=p["f_max"], normalize=True, mel_formula="slaney")
        lms = dmath.log(mel + LOG_EPS)
        if crop_frames is None:
            return (lms, index) if with_index else lms
        # The rule's padding leaves every clip longer than the crop; this pad only guards a `pad_for` shorter
        # than the crop (with the log-mel of silence, like random_crop). Then a uniformly placed window.
        lms = fn.pad(lms, axes=[1], shape=[crop_frames], fill_value=SILENCE_LOG)
        frames = fn.cast(lms.shape()[1], dtype=types.FLOAT)
        start = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (frames - crop_frames + 0.999))
        lms = fn.slice(lms, start=fn.cast(start, dtype=types.INT32), shape=[crop_frames], axes=[1])
        return (lms, index) if with_index else lms

    pipe = logmel()
    pipe.build()
    return pipe


def dali_threads(num_workers: int, local_processes: int) -> int:
    """CPU threads for one rank's DALI pipeline: data.num_workers, or this rank's share of the node's cores when
    that is more. Decoding is the CPU's part and the GPU's appetite is large (measured on 10 s FLAC: ~125 clips/s
    per thread against a ViT-B step's ~4,700 samples/s target on an H100), so a pipeline gets every core it can."""
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, num_workers, cores // max(1, local_processes))


class DaliLogMelLoader:
    """Iterates (B, 1, 80, T) raw log-mel torch tensors on the pipeline's device, one epoch per `iter()`
    (with `with_index=True`: (log-mel, the items' positions in `files`))."""

    def __init__(self, files: Sequence[str], batch_size: int, device: torch.device, **kw):
        reason = dali_missing_reason()
        if reason:
            raise RuntimeError(f"the DALI loader was requested, but {reason}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.batch_size = batch_size
        self.files: List[str] = [str(f) for f in files]
        self.with_index = kw.get("with_index", False)
        self.shards = kw.get("num_shards", 1)
        self.pipe = build_pipeline(self.files, batch_size, device_id=device.index if device.type == "cuda" else None,
                                   **kw)

    def __len__(self) -> int:
        return len(self.files) // self.shards // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        outputs = ["lms", "index"] if self.with_index else ["lms"]
        it = DALIGenericIterator(self.pipe, outputs, reader_name="reader", last_batch_policy=LastBatchPolicy.DROP,
                                 auto_reset=False)
        for batch in it:
            lms = batch[0]["lms"].unsqueeze(1)
            yield (lms, batch[0]["index"].reshape(-1).cpu()) if self.with_index else lms
        self.pipe.reset()
