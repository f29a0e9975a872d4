"""Audio front end: reading audio files and the natural-log mel spectrogram of docs/spec.md "Front end".

`LogMelSpectrogram` is the reference every other front end (DALI, precomputed shards) must match.
"""
from __future__ import annotations

import contextlib
import math
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchaudio

from .errors import AudioReadError  # noqa: F401  (re-exported)

# Window / hop / upper mel edge per sample rate, as the original models were trained.
FRONTEND_PARAMS = {
    16000: dict(n_fft=400, hop_length=160, f_min=50.0, f_max=8000.0),
    32000: dict(n_fft=800, hop_length=320, f_min=50.0, f_max=16000.0),
}
N_MELS = 80
LOG_EPS = float(torch.finfo(torch.float32).eps)  # 1.19e-7, added before the log (no clamping, no dB)
SILENCE_LOG = math.log(LOG_EPS)  # -15.94: the log-mel of digital silence

# Short clips, THE rule (every path follows it: reference loader, `prepare` + store, DALI, statistics):
# a clip shorter than the training crop is zero-padded at the end, as a WAVEFORM, to the crop plus two hops
# (20 ms). For the original's 608-frame (6.08 s) crop that is exactly its 6.1 s preparation; for a 2 s crop it is
# 2.02 s, so a crop of a short clip always holds the whole clip (start 0-3 frames), never mostly padding. Padded
# frames are the log-mel of silence, never 0 (which after normalisation would read as loud sound). Clips longer
# than that are not padded and are cropped uniformly. `data.repeat_short` tiles short clips instead (the
# original's other choice); background noise is always tiled.
PAD_HOPS = 2  # 6.1 s - 6.08 s: the original's margin beyond its crop


def pad_samples(sample_rate: int, crop_frames: int) -> int:
    """Waveform length that clips shorter than a `crop_frames` crop are zero-padded to (the rule above)."""
    return (crop_frames + PAD_HOPS) * FRONTEND_PARAMS[sample_rate]["hop_length"]


def padded_frames(crop_frames: int) -> int:
    """Log-mel frames of a short clip padded by the rule: (crop + 2) hops of samples -> crop + 3 frames."""
    return crop_frames + PAD_HOPS + 1


def min_real_samples(sample_rate: int, patch_frames: int) -> int:
    """Audio shorter than one patch width holds no usable patch: such files are listed as unusable."""
    return patch_frames * FRONTEND_PARAMS[sample_rate]["hop_length"]


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
            spectrogram = self.mel.spectrogram
            if wav.shape[-1] > spectrogram.n_fft // 2:
                return torch.log(self.mel(wav.float()) + LOG_EPS)
            # Shorter than half a window (a 1-sample file): reflection has nothing to mirror, so this clip's frames
            # are centred on zeros instead, the same number of frames (num_frames) as any other length.
            spectrogram.pad_mode = "constant"
            try:
                return torch.log(self.mel(wav.float()) + LOG_EPS)
            finally:
                spectrogram.pad_mode = "reflect"

    def uncentred(self, samples: torch.Tensor) -> torch.Tensor:
        """(N,) samples that already hold each frame's whole window -> (80, 1 + (N - n_fft) // hop) log-mel, frame k
        starting at sample k * hop: the frames `forward` computes, for a stretch of a longer signal
        (transfer/long_audio.py reads recordings in windows)."""
        spectrogram = self.mel.spectrogram
        with torch.autocast(samples.device.type, enabled=False):
            spectrogram.center = False
            try:
                return torch.log(self.mel(samples.float()) + LOG_EPS)
            finally:
                spectrogram.center = True

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.hop_length + 1


class LogMelByMatrices(torch.nn.Module):
    """`LogMelSpectrogram` as two matrix products, for graphs (ONNX) that have no complex numbers or FFT: the
    windowed real DFT of each hop as one strided Conv1d (cos and sin rows), power, then the mel filterbank. The
    window, sizes and filterbank are read from the LogMelSpectrogram it is built from (the one training uses), so
    the two cannot drift apart; they agree to float32 rounding (tests/test_onnx_waveform.py). Input: (B, N)
    waveforms of more than half a window (n_fft / 2 samples), as reflection needs."""

    def __init__(self, frontend: LogMelSpectrogram):
        super().__init__()
        spec = frontend.mel.spectrogram
        self.n_fft, self.hop = spec.n_fft, spec.hop_length
        window = spec.window.double()
        k = torch.arange(self.n_fft // 2 + 1, dtype=torch.float64)[:, None]
        angle = 2 * math.pi * k * torch.arange(self.n_fft, dtype=torch.float64)[None] / self.n_fft
        basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window  # (2 * bins, n_fft): real, imaginary
        self.register_buffer("dft", basis.float()[:, None, :])
        self.register_buffer("mel_fb", frontend.mel.mel_scale.fb.T.contiguous())  # (n_mels, bins)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(wav[:, None], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        spec = torch.nn.functional.conv1d(x, self.dft, stride=self.hop)  # (B, 2 * bins, T)
        re, im = spec.chunk(2, dim=1)
        return torch.log(torch.matmul(self.mel_fb, re * re + im * im) + LOG_EPS)


def normalize(lms, mean: float, std: float):
    """Log-mel -> the model's input: standardised by the training set's mean and std (computed once per data set
    and carried in every checkpoint as `norm_stats`). Works on tensors and arrays alike."""
    return (lms - mean) / std


@contextlib.contextmanager
def sound_file(path: str | Path):
    """libsndfile on a Python file object: any name the file system holds opens, the ones that are not valid
    UTF-8 too (soundfile encodes a path strictly and refuses them; Python's open keeps their bytes)."""
    import soundfile as sf  # optional at import time of the package
    with open(path, "rb") as raw, sf.SoundFile(raw) as f:
        yield f


def sound_info(path: str | Path):
    """(frames, sample rate) from the header, through `sound_file`."""
    with sound_file(path) as f:
        return f.frames, f.samplerate


def read_audio(path: str | Path, sample_rate: int, min_samples: int = 0) -> torch.Tensor:
    """Read a file (WAV, FLAC, OGG, MP3 ... via libsndfile), downmix to mono, resample -> float32 (N,).

    Raises AudioReadError naming the file when it is missing, empty, undecodable, holds fewer samples than its
    header promises, holds NaN/inf, or (min_samples, counted at `sample_rate`) is too short to use.
    """
    path = check_audio_path(path)
    with open(path, "rb") as raw:  # a Python file object: names that are not valid UTF-8 open too (sound_file)
        return decode_audio(raw, path, sample_rate, min_samples, truncation=lambda: wav_truncation(path))


def check_audio_path(path: str | Path) -> Path:
    """What is refused before any audio is decoded, naming the file: missing, a folder, empty (read_audio, and
    transfer/long_audio.py's windowed reader)."""
    path = Path(path)
    if not path.is_file():
        raise AudioReadError(f"{path}: file not found" if not path.is_dir() else f"{path}: a folder, not a file")
    if path.stat().st_size == 0:
        raise AudioReadError(f"{path}: empty file")
    return path


def decode_audio(raw, name, sample_rate: int, min_samples: int = 0, truncation=None) -> torch.Tensor:
    """`read_audio` on an open binary file object (a file, or a shard member's bytes in io.BytesIO); `name` is
    what errors say; `truncation()`, when given, returns why a WAV was cut (read_audio's header check) or None."""
    import soundfile as sf  # optional at import time of the package
    try:
        size = raw.seek(0, 2)
        raw.seek(0)
    except (AttributeError, OSError):
        size = None
    try:
        with sf.SoundFile(raw) as f:
            promised, sr = f.frames, f.samplerate
            check_declared(name, sr, promised, f.channels, size)  # from the header, before any payload is decoded
            data = f.read(dtype="float32", always_2d=True)
    except AudioReadError:
        raise
    except Exception as e:  # libsndfile raises several types for corrupt / non-audio input
        raise AudioReadError(f"{name}: cannot decode audio ({first_line(e)})") from None
    if data.shape[0] == 0:
        raise AudioReadError(f"{name}: no samples")
    if data.shape[0] < promised:
        raise AudioReadError(f"{name}: truncated: the header promises {promised} samples, the file holds "
                             f"{data.shape[0]}")
    have = data.shape[0] * sample_rate // sr
    if have < min_samples:
        raise AudioReadError(f"{name}: too short: {have / sample_rate * 1000:.0f} ms of audio, at least "
                             f"{min_samples / sample_rate * 1000:.0f} ms (one patch width) needed")
    reason = truncation() if truncation is not None else None
    if reason:
        raise AudioReadError(f"{name}: {reason}")
    wav = torch.from_numpy(mono(data, name))
    if sr != sample_rate:
        wav = resample(wav, sr, sample_rate, name)
    return wav


def mono(data: np.ndarray, name) -> np.ndarray:
    """(N, channels) decoded samples -> (N,) float32, the channels' mean; NaN / inf refused naming the file. Every
    reader mixes this way: whole files here, training crops' windows (data/dataset.py), long recordings' blocks
    (transfer/long_audio.py)."""
    x = np.ascontiguousarray(data.mean(axis=1), dtype=np.float32)
    if not np.isfinite(x).all():
        raise AudioReadError(f"{name}: contains NaN or infinite samples")
    return x


MAX_DECODED_BYTES = 1 << 30  # float32 samples one file may decode to, when it also inflates past MAX_AUDIO_INFLATION
MAX_AUDIO_INFLATION = 200  # decoded float32 bytes per file byte: lossless codecs reach ~10x on real sound; silence more


def check_declared(name, sr: int, frames: int, channels: int, file_bytes=None) -> None:
    """What an audio header declares, refused before the payload is read: a rate outside 1 kHz - 2 MHz (a FLAC at
    1 Hz resampled to 16 kHz once took 4.6 GB from a 958 KB file), or more than 1 GiB of float32 samples from a
    file that small (a compressed bomb)."""
    if not 1000 <= sr <= MAX_SAMPLE_RATE:
        raise AudioReadError(f"{name}: sample rate {sr} Hz: outside 1 kHz - {MAX_SAMPLE_RATE // 1000} kHz")
    decoded = frames * max(channels, 1) * 4
    if decoded > MAX_DECODED_BYTES and file_bytes and decoded > MAX_AUDIO_INFLATION * file_bytes:
        raise AudioReadError(f"{name}: declares {frames} samples x {channels} channel(s) ({decoded / 2**30:.1f} GiB "
                             f"decoded) in a {file_bytes / 2**10:.0f} KiB file: refused before decoding")


# torchaudio's polyphase resampler builds (new/g) x (orig/g)-sized sinc kernels, g = gcd: cheap for the usual
# rates (44.1 -> 16 kHz: 160 x 441), gigabytes for an awkward one (8009 Hz: 16000 x 8009, +2 GB). Past this
# product soxr (a streaming resampler, cost linear in the samples) takes over.
MAX_POLYPHASE = 200_000
MAX_SAMPLE_RATE = 2_000_000


def resample(wav: torch.Tensor, sr: int, target: int, path: str | Path = "") -> torch.Tensor:
    """(N,) float32 at `sr` -> at `target`, with bounded memory for any rate; failures name the file."""
    if not 1000 <= sr <= MAX_SAMPLE_RATE:
        raise AudioReadError(f"{path}: sample rate {sr} Hz: outside 1 kHz - {MAX_SAMPLE_RATE // 1000} kHz")
    g = math.gcd(sr, target)
    try:
        if (sr // g) * (target // g) <= MAX_POLYPHASE:
            return torchaudio.functional.resample(wav, sr, target)
        try:
            import soxr
        except ImportError:
            raise AudioReadError(f"{path}: resampling {sr} Hz to {target} Hz needs soxr (pip install soxr), or "
                                 f"convert the file to a common rate first") from None
        return torch.from_numpy(soxr.resample(wav.numpy(), sr, target, quality="VHQ").astype(np.float32))
    except AudioReadError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a resampler raises, it is this file's problem, not the run's
        raise AudioReadError(f"{path}: cannot resample {sr} Hz to {target} Hz ({first_line(e)})") from None


def wav_truncation(path: str | Path) -> Optional[str]:
    """'truncated: ...' with both lengths when a WAV's data chunk promises more bytes than the file holds.

    libsndfile sizes a cut WAV by the bytes present and reads it without a word (a FLAC's STREAMINFO count, by
    contrast, shows up in `frames`), so the RIFF header is read here: the chunks before `data` and its size.
    """
    path = Path(path)
    if path.suffix.lower() != ".wav":
        return None
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
                return None  # not a plain RIFF WAVE (RF64, W64 ...): libsndfile's own checks apply
            order = "<" if head[:4] == b"RIFF" else ">"
            block_align, pos = 0, 12
            while pos + 8 <= size:
                f.seek(pos)
                chunk_id, chunk_size = struct.unpack(order + "4sI", f.read(8))
                if chunk_id == b"fmt " and chunk_size >= 14:
                    block_align = struct.unpack(order + "H", f.read(14)[12:14])[0]
                elif chunk_id == b"data":
                    held = size - pos - 8
                    if chunk_size in (0, 0xFFFFFFFF) or chunk_size <= held or not block_align:
                        return None  # complete, or a stream writer's placeholder size
                    return (f"truncated: the header promises {chunk_size // block_align} samples, the file holds "
                            f"{held // block_align}")
                pos += 8 + chunk_size + (chunk_size & 1)  # chunks are word-aligned
    except (OSError, struct.error):
        return None  # unreadable headers are reported by the decoder
    return None


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line (libraries raise multi-line texts), for one-line error messages."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
