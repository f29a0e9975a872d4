"""Recordings of any length in bounded memory: a file read in windows of whole chunks, each window decoded,
resampled, turned into log-mel and encoded on its own, the frames handed on as they come.

The features equal the whole-file encoding (`Runtime.encode` on the decoded file) to float rounding, because every
step is made to see exactly what it sees there:
- decoding: libsndfile blocks, mixed to mono the same way (`frontend.decode_audio`);
- resampling: torchaudio's polyphase filter run on blocks that start on its period (orig/gcd input samples) with a
  margin wider than its kernel, so each output sample is the same dot product with the same inputs; rates that need
  soxr (`frontend.MAX_POLYPHASE`) use soxr's own streaming resampler, its one-shot function's engine;
- log-mel: each window's STFT frames computed without centring from the samples they cover, the file's first and
  last half window reflected as `torch.stft(center=True)` reflects them;
- encoding: windows are whole chunks of the training length, so the chunk boundaries are the whole file's.
Memory: one window of samples, log-mel and chunk activations (`WINDOW_CHUNKS` chunks: 97 s for 80x608 at 16 kHz),
whatever the recording's length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np
import torch

from ..errors import AudioReadError
from ..frontend import (FRONTEND_PARAMS, MAX_POLYPHASE, check_audio_path, check_declared, first_line, mono, sound_file,
                        wav_truncation)

WINDOW_CHUNKS = 16  # chunks of the training length encoded per window (one encoder batch)
BLOCK_SAMPLES = 1 << 18  # samples decoded per read (16 s at 16 kHz)


def stream_samples(path: str | Path, sample_rate: int) -> Iterator[np.ndarray]:
    """A file's samples at `sample_rate`, mono float32, in consecutive blocks; errors name the file, as
    `read_audio`'s do (a WAV cut short is refused before its first block: libsndfile would read what is there)."""
    path = check_audio_path(path)
    reason = wav_truncation(path)
    if reason:
        raise AudioReadError(f"{path}: {reason}")
    try:
        with sound_file(path) as f:
            check_declared(path, f.samplerate, f.frames, f.channels, path.stat().st_size)
            resampler = Resampler(f.samplerate, sample_rate, path)
            promised, read = f.frames, 0
            while True:
                block = f.read(BLOCK_SAMPLES, dtype="float32", always_2d=True)
                read += block.shape[0]
                last = block.shape[0] < BLOCK_SAMPLES
                out = resampler.push(mono(block, path), last)
                if out.size:
                    yield out
                if last:
                    break
    except AudioReadError:
        raise
    except Exception as e:  # libsndfile raises several types for corrupt / non-audio input
        raise AudioReadError(f"{path}: cannot decode audio ({first_line(e)})") from None
    if read == 0:
        raise AudioReadError(f"{path}: no samples")
    if read < promised:
        raise AudioReadError(f"{path}: truncated: the header promises {promised} samples, the file holds {read}")


class Resampler:
    """Streaming resampler whose output equals the one-shot `frontend.resample` of the whole signal."""

    def __init__(self, orig: int, new: int, name=""):
        g = math.gcd(orig, new)
        self.orig, self.new, self.sr, self.target, self.name = orig // g, new // g, orig, new, name
        self.kind = "same" if orig == new else "polyphase" if self.orig * self.new <= MAX_POLYPHASE else "soxr"
        if self.kind == "polyphase":
            # torchaudio's kernel reaches `width` input samples either side of each output's period (its
            # _get_sinc_resample_kernel, rolloff 0.99, 6 zero crossings); twice that plus a period is kept behind.
            width = math.ceil(6 * self.orig / (0.99 * min(self.orig, self.new)))
            self.margin = 2 * (width + self.orig)
            self.held = np.zeros(0, np.float32)  # input samples from global index `base` on (a multiple of orig)
            self.base = 0
            self.done = 0  # output samples handed out so far
        elif self.kind == "soxr":
            try:
                import soxr
            except ImportError:
                raise AudioReadError(f"{name}: resampling {orig} Hz to {new} Hz needs soxr (pip install soxr)") \
                    from None
            self.stream = soxr.ResampleStream(orig, new, 1, dtype="float32", quality="VHQ")

    def push(self, x: np.ndarray, last: bool) -> np.ndarray:
        if self.kind == "same":
            return x
        if self.kind == "soxr":
            return self.stream.resample_chunk(x, last=last).astype(np.float32, copy=False)
        import torchaudio
        self.held = np.concatenate([self.held, x])
        end = self.base + len(self.held)
        # outputs whose whole kernel lies inside what is held (all of them once the input has ended)
        ready = math.ceil(self.new * end / self.orig) if last else max(0, (end - self.margin) * self.new // self.orig)
        if ready <= self.done:
            return np.zeros(0, np.float32)
        out = torchaudio.functional.resample(torch.from_numpy(self.held), self.sr, self.target).numpy()
        first = self.base // self.orig * self.new  # the global index of out[0]
        piece = out[self.done - first:ready - first]
        self.done = ready
        keep_from = max(self.base, (self.done * self.orig // self.new - self.margin) // self.orig * self.orig)
        self.held, self.base = self.held[keep_from - self.base:], keep_from
        return piece


def lms_windows(samples: Iterator[np.ndarray], frontend, window_frames: int) -> Iterator[torch.Tensor]:
    """Consecutive (80, t) natural-log mel windows, `window_frames` each (the last shorter), whose concatenation is
    `frontend(whole signal)`: frame k covers samples [k*hop - n_fft/2, k*hop + n_fft/2), the signal's ends reflected."""
    hop, n_fft = frontend.hop_length, frontend.mel.spectrogram.n_fft
    half = n_fft // 2
    held = np.zeros(0, np.float32)  # samples from global index `start` on
    start, frame, head = 0, 0, None  # head: the first samples, for the left reflection
    for block in samples:
        held = np.concatenate([held, block])
        if head is None and start + len(held) > half:
            head = held[1:half + 1][::-1].copy()
        while head is not None and (frame + window_frames - 1) * hop + half <= start + len(held):
            b = frame + window_frames
            yield _frames(frontend, held, start, frame, b, head, None)
            frame = b
            drop = frame * hop - half - start
            if drop > 0:
                held, start = held[drop:], start + drop
    total = start + len(held)
    if total == 0:
        return
    if total <= half:  # shorter than half a window: the whole-file path's own rule (zeros, not reflection)
        yield frontend(torch.from_numpy(held))
        return
    if head is None:
        head = held[1:half + 1][::-1].copy()
    n_frames = total // hop + 1
    tail = held[-half - 1:-1][::-1].copy()  # the right reflection: x[N-2], x[N-3], ...
    while frame < n_frames:
        b = min(frame + window_frames, n_frames)
        yield _frames(frontend, held, start, frame, b, head, tail)
        frame = b


def _frames(frontend, held, start, a, b, head, tail) -> torch.Tensor:
    """Frames [a, b) from the held samples (global index `start` on), reflected at the signal's ends."""
    hop, half = frontend.hop_length, frontend.mel.spectrogram.n_fft // 2
    lo, hi = a * hop - half, (b - 1) * hop + half
    parts = []
    if lo < 0:
        parts.append(head[len(head) + lo:])
    parts.append(held[max(lo, 0) - start:min(hi, start + len(held)) - start])
    if hi > start + len(held):
        parts.append(tail[:hi - start - len(held)])
    return frontend.uncentred(torch.from_numpy(np.concatenate(parts)))


@dataclass
class Window:
    """One window's frame features (layers, each (t', F'*D)) and their centres in ms; log-mel frames and samples
    (at the model's rate) read so far: after the last window, the recording's."""
    layers: List[torch.Tensor]
    times_ms: torch.Tensor
    lms_frames: int
    samples: int


def encode_file(runtime, path: str | Path, layers: Optional[List[int]] = None,
                window_chunks: Optional[int] = None) -> Iterator[Window]:
    """A file's frame features window by window (`runtime.encode` of the whole file, in bounded memory), in the
    arithmetic `runtime.inference()` chooses; `layers`: block indices (None: the last block's output)."""
    window_chunks = window_chunks or WINDOW_CHUNKS
    unit, ms_per_frame = runtime.cfg.input_size[1], runtime.frontend.hop_length * 1000 / runtime.sample_rate
    done_lms, read = 0, [0]

    def counted():
        for block in stream_samples(path, runtime.sample_rate):
            read[0] += len(block)
            yield block
    for lms in lms_windows(counted(), runtime.frontend, window_chunks * unit):
        with runtime.inference():
            out = runtime.encode_lms(runtime.normalize(lms.to(runtime.device))[None, None],
                                     return_layers=layers is not None)
        picked = [out[k] for k in layers] if layers is not None else [out]
        picked = [z[0].float() for z in picked]
        times = runtime.frame_times_ms(lms.shape[-1]) + done_lms * ms_per_frame  # windows start on chunk boundaries
        done_lms += lms.shape[-1]
        yield Window(picked, times, done_lms, read[0])


def recording_seconds(path: str | Path) -> float:
    """A file's length from its header (0 when the header cannot say)."""
    try:
        with sound_file(path) as f:
            return f.frames / f.samplerate if f.samplerate else 0.0
    except Exception:  # noqa: BLE001 - unreadable headers are reported by the decoder
        return 0.0


def is_long(runtime, path: str | Path, window_chunks: Optional[int] = None) -> bool:
    """Longer than one window: read in windows (`encode_file`) rather than whole (`read_audio`)."""
    hop = FRONTEND_PARAMS[runtime.sample_rate]["hop_length"]
    window_frames = (window_chunks or WINDOW_CHUNKS) * runtime.cfg.input_size[1]
    return recording_seconds(path) * runtime.sample_rate / hop > window_frames
