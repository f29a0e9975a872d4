"""The log-mel front end against an independent float64 NumPy computation of docs/spec.md's definition."""
import numpy as np
import pytest
import torch

from fastm2d.frontend import AudioReadError, LogMelSpectrogram, read_audio

from .conftest import write_tone


def slaney_hz_to_mel(f):
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    logstep = np.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) / logstep, lin)


def slaney_mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), m * 200.0 / 3)


def numpy_log_mel(wav, sr, n_fft, hop, fmin, fmax, n_mels=80):
    """Periodic Hann, centred reflect-padded frames, |rfft|^2, Slaney mel with area norm, log(x + eps)."""
    wav = np.pad(wav.astype(np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    n_frames = 1 + (len(wav) - n_fft) // hop
    frames = np.stack([wav[i * hop:i * hop + n_fft] * window for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (T, n_fft/2+1)
    fft_hz = np.linspace(0, sr / 2, n_fft // 2 + 1)
    hz = slaney_mel_to_hz(np.linspace(slaney_hz_to_mel(fmin), slaney_hz_to_mel(fmax), n_mels + 2))
    fb = np.zeros((n_mels, len(fft_hz)))
    for m in range(n_mels):
        lo, c, hi = hz[m], hz[m + 1], hz[m + 2]
        up = (fft_hz - lo) / (c - lo)
        down = (hi - fft_hz) / (hi - c)
        fb[m] = np.maximum(0, np.minimum(up, down)) * 2.0 / (hi - lo)
    return np.log(fb @ power.T + np.finfo(np.float32).eps)


@pytest.mark.parametrize("sr, n_fft, hop, fmax", [(16000, 400, 160, 8000), (32000, 800, 320, 16000)])
def test_log_mel_matches_independent_numpy(sr, n_fft, hop, fmax):
    rng = np.random.default_rng(1)
    n = int(sr * 0.73) + 7
    t = np.arange(n) / sr
    wav = 0.2 * rng.standard_normal(n) + 0.5 * np.sin(2 * np.pi * 1234.5 * t)  # noise keeps every bin well above eps
    ours = LogMelSpectrogram(sr)(torch.from_numpy(wav.astype(np.float32))).double().numpy()
    ref = numpy_log_mel(wav, sr, n_fft, hop, 50.0, fmax)
    assert ours.shape == ref.shape == (80, n // hop + 1)
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


def test_ten_seconds_is_1001_frames_and_batched():
    lms = LogMelSpectrogram()(torch.zeros(3, 160000))
    assert lms.shape == (3, 80, 1001)
    # Silence is log(eps): no clamping, no dB scaling.
    assert torch.allclose(lms, torch.full_like(lms, float(np.log(np.float32(np.finfo(np.float32).eps)))))


def test_rejects_unsupported_rate_and_shape():
    with pytest.raises(ValueError, match="22050"):
        LogMelSpectrogram(22050)
    with pytest.raises(ValueError, match="shape"):
        LogMelSpectrogram()(torch.zeros(1, 1, 100))


@pytest.mark.parametrize("fmt, ext", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg")])
def test_read_audio_formats_downmix_and_resample(tmp_path, fmt, ext):
    path = write_tone(tmp_path / f"a.{ext}", seconds=0.5, sr=22050, channels=2, fmt=fmt)
    wav = read_audio(path, 16000)
    assert wav.dtype == torch.float32 and wav.dim() == 1
    assert abs(len(wav) - 8000) <= 1
    # The two channels were the tone at 0.5x and 1x amplitude: the downmix has 0.75 x 0.3 peak amplitude.
    assert 0.18 < wav.abs().max().item() < 0.28


def test_read_audio_errors_name_the_file(tmp_path):
    with pytest.raises(AudioReadError, match="missing.wav.*not found"):
        read_audio(tmp_path / "missing.wav", 16000)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioReadError, match="empty.wav.*empty"):
        read_audio(tmp_path / "empty.wav", 16000)
    (tmp_path / "junk.flac").write_bytes(b"this is not audio" * 100)
    with pytest.raises(AudioReadError, match="junk.flac.*cannot decode"):
        read_audio(tmp_path / "junk.flac", 16000)
