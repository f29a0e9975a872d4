"""The embedded default data: procedurally generated sound scenes, so `fastm2d pretrain` runs with no data.

Each clip is a deterministic function of (seed, index): a faint noise floor plus 2-6 events at random onsets
and levels, drawn from tones with vibrato and harmonics, chirps, filtered noise bursts, click trains and
AM/FM textures. They give the masked-prediction task real time-frequency structure to learn.
"""
from __future__ import annotations

import numpy as np


def _envelope(n: int, rng: np.random.Generator) -> np.ndarray:
    attack, release = (max(1, int(n * f)) for f in rng.uniform(0.01, 0.3, size=2))
    env = np.ones(n)
    env[:attack] = np.linspace(0.0, 1.0, attack)
    env[n - release:] *= np.linspace(1.0, 0.0, release)
    return env


def _tone(t, rng, sr):
    f0 = rng.uniform(80, 1200)
    vib = 1 + rng.uniform(0, 0.03) * np.sin(2 * np.pi * rng.uniform(3, 8) * t)
    phase = 2 * np.pi * np.cumsum(f0 * vib) / sr
    n_harm = rng.integers(1, 8)
    decay = rng.uniform(0.3, 0.9)
    return sum(decay**h * np.sin((h + 1) * phase) for h in range(n_harm) if (h + 1) * f0 < sr / 2)


def _chirp(t, rng, sr):
    f1, f2 = rng.uniform(100, sr / 2.5, size=2)
    dur = max(t[-1], 1e-3)
    freq = f1 * (f2 / f1) ** (t / dur)  # exponential sweep
    return np.sin(2 * np.pi * np.cumsum(freq) / sr)


def _noise_burst(t, rng, sr):
    spec = np.fft.rfft(rng.standard_normal(len(t)))
    freqs = np.fft.rfftfreq(len(t), 1 / sr)
    lo = rng.uniform(50, sr / 4)
    band = (freqs > lo) & (freqs < lo * rng.uniform(1.5, 4))
    return np.fft.irfft(spec * band, n=len(t)) * 4


def _clicks(t, rng, sr):
    out = np.zeros(len(t))
    period = max(1, int(sr / rng.uniform(2, 40)))
    out[::period] = 1.0
    decay = np.exp(-np.arange(min(200, len(t))) / rng.uniform(5, 60))
    return np.convolve(out, decay * rng.standard_normal(len(decay)), mode="same")


def _am_fm(t, rng, sr):
    fc = rng.uniform(200, 3000)
    fm = fc * rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * rng.uniform(0.5, 12) * t)
    am = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(1, 20) * t))
    carrier = np.sin(2 * np.pi * np.cumsum(fc + fm) / sr)
    return am * (carrier if rng.random() < 0.5 else carrier * rng.standard_normal(len(t)))


EVENTS = (_tone, _chirp, _noise_burst, _clicks, _am_fm)


EVENT_NAMES = ("tone", "chirp", "noise", "clicks", "am_fm")
BANDS = ((100.0, 400.0), (500.0, 1500.0), (2000.0, 5000.0))  # low / mid / high: the labelled set's "pitch"
BAND_NAMES = ("low", "mid", "high")


def _in_band(kind: int, band, t, rng, sr):
    """An event of `kind` whose characteristic frequency lies in `band` (Hz)."""
    lo, hi = band
    f = rng.uniform(lo, hi)
    if kind == 0:  # harmonic tone with vibrato
        vib = 1 + rng.uniform(0, 0.03) * np.sin(2 * np.pi * rng.uniform(3, 8) * t)
        phase = 2 * np.pi * np.cumsum(f * vib) / sr
        return sum(0.6**h * np.sin((h + 1) * phase) for h in range(3) if (h + 1) * f < sr / 2)
    if kind == 1:  # sweep within the band
        f2 = rng.uniform(lo, hi)
        return np.sin(2 * np.pi * np.cumsum(f * (f2 / f) ** (t / max(t[-1], 1e-3))) / sr)
    if kind == 2:  # band-limited noise around f
        spec = np.fft.rfft(rng.standard_normal(len(t)))
        freqs = np.fft.rfftfreq(len(t), 1 / sr)
        return np.fft.irfft(spec * ((freqs > f / 1.3) & (freqs < f * 1.3)), n=len(t)) * 4
    if kind == 3:  # click train exciting a resonance at f
        out = np.zeros(len(t))
        out[::max(1, int(sr / rng.uniform(4, 20)))] = 1.0
        k = np.arange(min(400, len(t))) / sr
        return np.convolve(out, np.exp(-k * rng.uniform(60, 200)) * np.sin(2 * np.pi * f * k), mode="same")
    fm = f * 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 6) * t)  # kind 4: AM/FM texture
    return 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(4, 16) * t)) * np.sin(2 * np.pi * np.cumsum(f + fm) / sr)


def _labelled_draw(seed: int, index: int):
    """The clip's generator and its labels, drawn first: the labels cost no audio."""
    rng = np.random.default_rng([seed, 0x1AB, index])
    return rng, int(rng.integers(len(EVENT_NAMES))), int(rng.integers(len(BANDS)))


def synth_labels(seed: int, index: int):
    """(event index, band index) of synth_labelled_clip(seed, index), without generating it."""
    return _labelled_draw(seed, index)[1:]


def synth_labelled_clip(seed: int, index: int, seconds: float = 2.0, sample_rate: int = 16000):
    """A clip whose labels are known: one loud dominant event (type in EVENT_NAMES, frequency in one of BANDS)
    over 40-90 % of the clip, plus 1-3 quieter distractors from the unlabelled generators and a noise floor.
    Returns (float32 waveform, event index, band index); a pure function of (seed, index)."""
    rng, kind, band = _labelled_draw(seed, index)
    n = int(seconds * sample_rate)
    wav = rng.standard_normal(n) * 10 ** (rng.uniform(-70, -50) / 20)
    for _ in range(rng.integers(1, 4)):  # distractors, 12-30 dB below the labelled event
        length = int(n * rng.uniform(0.1, 0.5))
        start = rng.integers(0, n - length)
        t = np.arange(length) / sample_rate
        event = EVENTS[rng.integers(len(EVENTS))](t, rng, sample_rate)
        wav[start:start + length] += event / (np.abs(event).max() + 1e-9) * 10 ** (rng.uniform(-35, -18) / 20)
    length = int(n * rng.uniform(0.4, 0.9))
    start = rng.integers(0, n - length)
    t = np.arange(length) / sample_rate
    event = _in_band(kind, BANDS[band], t, rng, sample_rate)
    wav[start:start + length] += event / (np.abs(event).max() + 1e-9) * _envelope(length, rng) * \
        10 ** (rng.uniform(-9, -3) / 20)
    return (wav / max(1.0, np.abs(wav).max())).astype(np.float32), kind, band


def synth_clip(seed: int, index: int, seconds: float = 6.1, sample_rate: int = 16000) -> np.ndarray:
    """A float32 waveform in [-1, 1] of `seconds`, identical for the same (seed, index)."""
    rng = np.random.default_rng([seed, index])
    n = int(seconds * sample_rate)
    wav = rng.standard_normal(n) * 10 ** (rng.uniform(-70, -50) / 20)  # noise floor
    for _ in range(rng.integers(2, 7)):
        length = int(n * rng.uniform(0.05, 0.6))
        start = rng.integers(0, n - length)
        t = np.arange(length) / sample_rate
        event = EVENTS[rng.integers(len(EVENTS))](t, rng, sample_rate)
        event = event / (np.abs(event).max() + 1e-9) * _envelope(length, rng)
        wav[start:start + length] += event * 10 ** (rng.uniform(-35, -3) / 20)
    return (wav / max(1.0, np.abs(wav).max())).astype(np.float32)
