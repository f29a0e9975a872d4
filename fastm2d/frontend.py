"""Audio front end: reading audio files and the natural-log mel spectrogram of SPEC.md "Front end".

`LogMelSpectrogram` is the reference every other front end (DALI, precomputed shards) must match.
"""
from __future__ import annotations

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


def read_audio(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Read a file (WAV, FLAC, OGG, MP3 ... via libsndfile), downmix to mono, resample -> float32 (N,)."""
    import soundfile as sf  # optional at import time of the package

    path = Path(path)
    if not path.is_file():
        raise AudioReadError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise AudioReadError(f"{path}: empty file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types for corrupt / non-audio input
        raise AudioReadError(f"{path}: cannot decode audio ({e})") from None
    if data.shape[0] == 0:
        raise AudioReadError(f"{path}: no samples")
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if not torch.isfinite(wav).all():
        raise AudioReadError(f"{path}: contains NaN or infinite samples")
    if sr != sample_rate:
        wav = torchaudio.functional.resample(wav, sr, sample_rate)
    return wav
