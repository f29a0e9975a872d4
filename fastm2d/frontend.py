"""Audio front end: reading audio files and the natural-log mel spectrogram of SPEC.md "Front end".

`LogMelSpectrogram` is the reference every other front end (DALI, precomputed shards) must match.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torchaudio

# Window / hop / upper mel edge per sample rate, as the original models were trained.
FRONTEND_PARAMS = {
    16000: dict(n_fft=400, hop_length=160, f_min=50.0, f_max=8000.0),
    32000: dict(n_fft=800, hop_length=320, f_min=50.0, f_max=16000.0),
}
N_MELS = 80
LOG_EPS = float(torch.finfo(torch.float32).eps)  # 1.19e-7, added before the log (no clamping, no dB)
SILENCE_LOG = math.log(LOG_EPS)  # -15.94: the log-mel of digital silence

# Short clips, one rule on every path (reference loader, `prepare`, DALI): as the original's data preparation,
# the WAVEFORM is zero-padded at the end to at least PAD_SECONDS (and to at least the training crop), so padded
# frames are the log-mel of silence, never 0 (which after normalisation would read as loud sound). A log-mel
# still shorter than the crop (a short precomputed .npy) is padded with SILENCE_LOG.
PAD_SECONDS = 6.1


def pad_samples(sample_rate: int, crop_frames: int) -> int:
    """Waveform length that short clips are zero-padded to: 6.1 s, or more when the crop is longer."""
    return max(round(PAD_SECONDS * sample_rate), (crop_frames - 1) * FRONTEND_PARAMS[sample_rate]["hop_length"])


def min_real_samples(sample_rate: int, patch_frames: int) -> int:
    """Audio shorter than one patch width holds no usable patch: such files are listed as unusable."""
    return patch_frames * FRONTEND_PARAMS[sample_rate]["hop_length"]


class AudioReadError(RuntimeError):
    """An audio file could not be read; the message names the file and the reason."""


class LogMelSpectrogram(torch.nn.Module):
    """waveform (B, N) or (N,) -> natural-log mel (B, 80, T), T = N // hop + 1. Not normalised."""

    def __init__(self, sample_rate: int = 16000):
        super().__init__()
        if sample_rate not in FRONTEND_PARAMS:
            raise ValueError(f"sample_rate={sample_rate}: fastm2d models use {sorted(FRONTEND_PARAMS)}")
        p = FRONTEND_PARAMS[sample_rate]
        self.sample_rate = sample_rate
        self.hop_length = p["hop_length"]
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=p["n_fft"], win_length=p["n_fft"], hop_length=p["hop_length"],
            f_min=p["f_min"], f_max=p["f_max"], n_mels=N_MELS, power=2.0, center=True, pad_mode="reflect",
            window_fn=torch.hann_window,  # periodic by default
            norm="slaney", mel_scale="slaney",  # HTK or no normalisation silently breaks released weights
        )

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.dim() not in (1, 2):
            raise ValueError(f"LogMelSpectrogram expects (N,) or (B, N) waveforms, got shape {tuple(wav.shape)}")
        # The STFT runs in fp32 even under autocast: log of tiny powers needs the precision.
        with torch.autocast(wav.device.type, enabled=False):
            return torch.log(self.mel(wav.float()) + LOG_EPS)

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length + 1


def read_audio(path: str | Path, sample_rate: int, min_samples: int = 0) -> torch.Tensor:
    """Read a file (WAV, FLAC, OGG, MP3 ... via libsndfile), downmix to mono, resample -> float32 (N,).

    Raises AudioReadError naming the file when it is missing, empty, undecodable, holds fewer samples than its
    header promises, holds NaN/inf, or (min_samples, counted at `sample_rate`) is too short to use.
    """
    import soundfile as sf  # optional at import time of the package

    path = Path(path)
    if not path.is_file():
        raise AudioReadError(f"{path}: file not found" if not path.is_dir() else f"{path}: a folder, not a file")
    if path.stat().st_size == 0:
        raise AudioReadError(f"{path}: empty file")
    try:
        with sf.SoundFile(str(path)) as f:
            promised, sr = f.frames, f.samplerate
            data = f.read(dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types for corrupt / non-audio input
        raise AudioReadError(f"{path}: cannot decode audio ({first_line(e)})") from None
    if data.shape[0] == 0:
        raise AudioReadError(f"{path}: no samples")
    if data.shape[0] < promised:
        raise AudioReadError(f"{path}: truncated: the header promises {promised} samples, the file holds "
                             f"{data.shape[0]}")
    have = data.shape[0] * sample_rate // sr
    if have < min_samples:
        raise AudioReadError(f"{path}: too short: {have / sample_rate * 1000:.0f} ms of audio, at least "
                             f"{min_samples / sample_rate * 1000:.0f} ms (one patch width) needed")
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if not torch.isfinite(wav).all():
        raise AudioReadError(f"{path}: contains NaN or infinite samples")
    if sr != sample_rate:
        wav = torchaudio.functional.resample(wav, sr, sample_rate)
    return wav


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line (libraries raise multi-line texts), for one-line error messages."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
