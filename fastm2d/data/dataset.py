"""Reference data path: items -> full log-mel (F, T) -> random crop, pad -> (1, F, T_crop), not yet normalised.

Normalisation (and M2D-X noise mixing) happens on the training device, so crops travel in their stored dtype
(fp16 from a prepared store: half the bytes through pinned memory).

Random crops are a pure function of the sampler's per-item seed, so the data order and crops are the same
whatever the number of workers, and a resumed run sees exactly the batches the uninterrupted one would.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..frontend import (MAX_POLYPHASE, SILENCE_LOG, AudioReadError, LogMelSpectrogram, mono, read_audio, resample,
                        sound_file, sound_info, wav_truncation)
from ..atomic import open_append
from .file_list import as_file_list
from .noise import tile_crop
from .sources import LMS_EXT, DataError, lms_array
from .synthetic import synth_clip

log = logging.getLogger("fastm2d.data")
FOUND_WHILE_TRAINING = " (found while training)"  # how bad_training_files.txt marks what the header check missed


def load_lms_file(path: Path, frontend: LogMelSpectrogram, pad_to: int = 0, min_samples: int = 0,
                  min_frames: int = 1) -> Tuple[np.ndarray, int]:
    """One file -> ((F, T) log-mel, frames of its own audio before any padding). Original-style .npy is
    memory-mapped (a crop reads only its bytes; its frames all count as audio); audio goes through the reference
    front end, its waveform zero-padded to `pad_to` samples first (frontend.py's rule for short clips). Files
    shorter than one patch width (`min_samples` / `min_frames`) raise with the reason."""
    if path.suffix.lower() == LMS_EXT:
        arr, reason = lms_array(path, frontend.mel.n_mels, min_frames)
        if reason:
            raise DataError(f"{path}: {reason}")
        return arr.reshape(arr.shape[-2], arr.shape[-1]), arr.shape[-1]
    wav = read_audio(path, frontend.sample_rate, min_samples)
    return padded_lms(wav, frontend, pad_to), frontend.num_frames(len(wav))


def padded_lms(wav: torch.Tensor, frontend: LogMelSpectrogram, pad_to: int = 0) -> np.ndarray:
    """A waveform -> (F, T) log-mel, zero-padded to `pad_to` samples first (frontend.py's rule for short clips)."""
    if len(wav) < pad_to:
        wav = torch.nn.functional.pad(wav, (0, pad_to - len(wav)))
    with torch.inference_mode():
        return frontend(wav).numpy()


class _Info(NamedTuple):
    """A header's frames and rate (soundfile.info's two fields that the windowed read uses)."""
    frames: int
    samplerate: int


class LogMelSource:
    """Index -> float32 log-mel (F, T) of one item, short clips already padded by frontend.py's rule (`pad_to`
    = frontend.pad_samples of the crop; 0 for sources that tile short clips instead). `names[i]` says what item
    i is, for error messages. min_samples / min_frames: one patch width (frontend.min_real_samples).
    """

    def __init__(self, files: Optional[Sequence[Path]] = None, sample_rate: int = 16000,
                 synthetic: Tuple[int, int, float] | None = None, pad_to: int = 0, min_samples: int = 0,
                 min_frames: int = 1):
        self.files = as_file_list(files or [])  # compact, shared by forked loader workers (file_list.py)
        self.sample_rate = sample_rate
        self.synthetic = synthetic  # (seed, n_clips, seconds) or None
        self.frontend = LogMelSpectrogram(sample_rate)
        self.pad_to, self.min_samples, self.min_frames = pad_to, min_samples, min_frames
        self._cache = {}  # synthetic clips are cheap to keep: 512 x 80 x 611 floats = 100 MB

    def __len__(self) -> int:
        return self.synthetic[1] if self.synthetic else len(self.files)

    @property
    def names(self) -> Sequence[str]:
        return [f"synthetic:{i}" for i in range(len(self))] if self.synthetic else self.files.names()

    def crop(self, i: int, frames: int, rng: np.random.Generator, repeat_short: bool = False,
             dtype=np.float32) -> Tuple[np.ndarray, int]:
        """`crop_clip` of item i; a long audio file is read only by the crop's window (the same start, the same
        values as cropping the whole file's log-mel)."""
        info = self._long_audio(i, frames)
        if info is None:
            return crop_clip(self.load(i), frames, rng, repeat_short, dtype)
        total = self.frontend.num_frames(-(-info.frames * self.sample_rate // info.samplerate))
        start = crop_start(total, frames, rng)
        lms = window_read(self.files[i], self.frontend, start, frames, info)
        if lms is None:  # the window touches the file's ends
            return crop_at(self.load(i), start, frames, dtype), start
        return np.ascontiguousarray(lms, dtype=dtype), start

    def _long_audio(self, i: int, frames: int):
        """The soundfile info of item i when it is a seekable audio file many crops long, else None."""
        if self.synthetic or self.files[i].suffix.lower() not in SEEKABLE:
            return None
        try:
            info = _Info(*sound_info(self.files[i]))
        except Exception:  # noqa: BLE001 - the whole-file read reports it with the reason
            return None
        if info.frames * self.sample_rate < WINDOW_MIN_CROPS * frames * self.frontend.hop_length * info.samplerate \
                or wav_truncation(self.files[i]) or info.frames < self.min_samples * info.samplerate // self.sample_rate:
            return None
        return info

    def load(self, i: int) -> np.ndarray:
        """Full log-mel of item i (a memory-mapped view for .npy files)."""
        if self.synthetic:
            if i not in self._cache:
                seed, _, seconds = self.synthetic
                wav = torch.from_numpy(synth_clip(seed, i, seconds, self.sample_rate))
                self._cache[i] = padded_lms(wav, self.frontend, self.pad_to)
            return self._cache[i]
        return load_lms_file(self.files[i], self.frontend, self.pad_to, self.min_samples, self.min_frames)[0]


# Long files are read by the crop's window, not whole: a 32-minute WAV costs +0.75 GB per crop otherwise. Formats
# whose seeking is sample-exact only; resampled by torchaudio (aligned to its polyphase blocks, so the window's
# samples equal the whole file's); files shorter than this many crops are read whole (cheaper, no edge cases).
SEEKABLE = {".wav", ".flac", ".aif", ".aiff"}
WINDOW_MIN_CROPS = 4
CONTEXT_FRAMES = 2  # frames of context each side: a centred frame reaches n_fft/2 = 1.25 hops beyond its centre


def window_read(path: Path, frontend: LogMelSpectrogram, start: int, frames: int, info) -> Optional[np.ndarray]:
    """(F, frames) log-mel of frames [start, start + frames) computed from the part of the file they need, equal
    to the same window of the whole file's log-mel; None where the window reaches the file's ends (the whole file's
    reflect padding applies there)."""
    import math

    sr, target, hop = info.samplerate, frontend.sample_rate, frontend.hop_length
    g = math.gcd(sr, target)
    if sr != target and (sr // g) * (target // g) > MAX_POLYPHASE:
        return None  # soxr's stream is not block-aligned: read whole
    lo_t, hi_t = (start - CONTEXT_FRAMES) * hop, (start + frames - 1 + CONTEXT_FRAMES) * hop + 1  # target samples
    block_in, block_out = sr // g, target // g
    margin = max(2, math.ceil(0.05 * sr / block_in))  # 50 ms of resampling-filter context, in whole blocks
    lo_b, hi_b = lo_t // block_out - margin, -(-hi_t // block_out) + margin
    if lo_t < 0 or lo_b < 0 or hi_b * block_in > info.frames:
        return None
    with sound_file(path) as f:
        f.seek(lo_b * block_in)
        data = f.read((hi_b - lo_b) * block_in, dtype="float32", always_2d=True)
    wav = torch.from_numpy(mono(data, path))
    if sr != target:
        wav = resample(wav, sr, target, path)
    offset = lo_t - lo_b * block_out
    with torch.inference_mode():
        lms = frontend(wav[offset:offset + hi_t - lo_t]).numpy()
    return lms[:, CONTEXT_FRAMES:CONTEXT_FRAMES + frames]


def crop_start(t: int, frames: int, rng: np.random.Generator) -> int:
    """Start of a uniformly placed window of `frames` in `t` frames (0 when the clip is not longer)."""
    return int(rng.integers(0, t - frames + 1)) if t > frames else 0


def crop_at(lms: np.ndarray, start: int, frames: int, dtype=np.float32) -> np.ndarray:
    """(F, T) -> (F, frames) from `start`, padded at the end with the log-mel of silence (SILENCE_LOG, frontend.py's
    short-clip rule) when the clip is shorter."""
    t = lms.shape[-1]
    if t > frames:
        return np.ascontiguousarray(lms[:, start:start + frames], dtype=dtype)
    out = np.full((lms.shape[0], frames), SILENCE_LOG, dtype=dtype)
    out[:, :t] = lms
    return out


def random_crop(lms: np.ndarray, frames: int, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """(F, T) -> (F, frames): a random window, or the whole clip padded with silence when shorter."""
    return crop_at(lms, crop_start(lms.shape[-1], frames, rng), frames, dtype)


def crop_clip(lms: np.ndarray, frames: int, rng: np.random.Generator, repeat_short: bool = False,
              dtype=np.float32) -> Tuple[np.ndarray, int]:
    """The training crop of one item's log-mel -> (crop, start). Sources hand items over already padded by
    frontend.py's short-clip rule, so this is a uniform window; with `repeat_short` (sources then pad nothing) a
    clip shorter than the crop is tiled instead (start 0: offline targets are read from the clip's beginning)."""
    if repeat_short and lms.shape[-1] < frames:
        return tile_crop(lms, frames, rng, dtype), 0
    start = crop_start(lms.shape[-1], frames, rng)
    return crop_at(lms, start, frames, dtype), start


def training_crop(repeat_short: bool):
    """`crop_clip` as the (lms, frames, rng) -> crop function that statistics take."""
    return lambda lms, frames, rng: crop_clip(lms, frames, rng, repeat_short)[0]


class CropDataset(Dataset):
    """Indexed by (item, crop seed, sample number) from `EpochSampler`.

    Returns {'lms': (1, F, T) raw log-mel, 'skipped': n, 'bad': the indices of items that failed (-1 padded)},
    with a `background` 'bg': the tiled crop of the background item of this sample number, and
    with M2D-X offline targets 'offline': `offline(item, crop start, crop seed)` of the item actually used.

    Whatever a file holds never stops training: an item that fails when read (undecodable, truncated, NaN/inf,
    or any other error) is logged, appended with its reason to `bad_list` (a text file), and replaced by the
    next item; the trainer passes its index to the sampler, which leaves it out for the rest of the run.
    With on_bad_file='error' it raises `DataError` instead.
    """

    MAX_SUBSTITUTES = 16

    def __init__(self, source, frames: int, on_bad_file: str = "skip", background=None,
                 bad_list: Optional[Path] = None, offline=None, repeat_short: bool = False):
        self.source = source  # a LogMelSource or a LogMelStore: len(), names, load(i) -> (F, T)
        self.frames = frames
        self.repeat_short = repeat_short
        self.on_bad_file = on_bad_file
        self.dtype = getattr(source, "dtype", np.float32)
        self.background = background  # noise.BackgroundCrops: sample number -> its noise crop (M2D-X)
        self.bad_list = bad_list
        self.offline = offline

    def __len__(self) -> int:
        return len(self.source)

    def crop(self, i: int, seed: int) -> Tuple[np.ndarray, int]:
        rng = np.random.default_rng(seed)
        if isinstance(self.source, LogMelSource):  # long files by window
            lms, start = self.source.crop(i, self.frames, rng, self.repeat_short, self.dtype)
        else:
            lms, start = crop_clip(self.source.load(i), self.frames, rng, self.repeat_short, self.dtype)
        if not np.isfinite(lms).all():
            raise DataError(f"{self.source.names[i]}: log-mel contains NaN or infinite values")
        return lms, start

    def _record(self, j: int, error: Exception) -> None:
        reason = str(error) if isinstance(error, (DataError, AudioReadError)) else \
            f"{self.source.names[j]}: {type(error).__name__}: {error}"
        log.warning("skipping bad training item (left out for the rest of the run): %s", reason)
        if self.bad_list is not None:  # one short O_APPEND write per line: safe from several workers and ranks
            with open_append(self.bad_list) as f:
                f.write(f"{reason}{FOUND_WHILE_TRAINING}\n")

    def __getitem__(self, key: Tuple[int, ...]):
        i, seed = key[0], key[1]
        bad = torch.full((self.MAX_SUBSTITUTES,), -1, dtype=torch.int64)
        for skipped in range(self.MAX_SUBSTITUTES):
            j = (i + skipped) % len(self.source)
            try:
                lms, start = self.crop(j, seed)
            except Exception as e:  # noqa: BLE001 - nothing a file holds may stop a running job
                if self.on_bad_file == "error":
                    raise DataError(str(e) if isinstance(e, (DataError, AudioReadError)) else
                                    f"{self.source.names[j]}: {type(e).__name__}: {e}") from None
                self._record(j, e)
                bad[skipped] = j
                continue
            item = {"lms": torch.from_numpy(lms).unsqueeze(0), "skipped": skipped, "bad": bad}
            if self.background is not None:
                item["bg"] = torch.from_numpy(self.background(key[2])).unsqueeze(0)
            if self.offline is not None:
                item["offline"] = torch.from_numpy(np.ascontiguousarray(self.offline(j, start, seed), dtype=np.float32))
            return item
        raise DataError(f"{self.MAX_SUBSTITUTES} consecutive unusable items from {self.source.names[i]} on")
