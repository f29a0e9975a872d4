"""Recordings of any length in bounded memory (transfer/long_audio.py): read in windows, the samples, log-mel and
features equal to decoding and encoding the whole file (`read_audio` + `Runtime.encode`, the independent path);
`embed` and `tag` take the window path for long files, never decoding them whole."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch

import fastm2d.transfer.long_audio as long_audio
from fastm2d import read_audio
from fastm2d.cli import main
from fastm2d.errors import AudioReadError
from fastm2d.frontend import LogMelSpectrogram


def _recording(path, seconds: float, sr: int) -> np.ndarray:
    """Real recorded sound (LMMS's sample library, when fetched: benchmarks/real_sounds.py) joined end to end to
    `seconds` at `sr`, else noise with tones; stereo, so the mono mix is part of what is compared."""
    from benchmarks.real_sounds import sound_files
    real = [f for f in sound_files("lmms-common", "usr/share/lmms/samples") if f.suffix.lower() in (".ogg", ".wav")]
    n = int(seconds * sr)
    pieces, have = [], 0
    for f in real[::7]:
        try:
            x = read_audio(f, sr).numpy()
        except AudioReadError:  # LMMS ships a few files libsndfile cannot open (wind_chimes01.ogg)
            continue
        pieces.append(x)
        have += len(x)
        if have >= n:
            break
    rng = np.random.default_rng(0)
    if have < n:
        t = np.arange(n - have) / sr
        pieces.append((0.2 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32))
    x = np.concatenate(pieces)[:n]
    sf.write(str(path), np.stack([x, 0.5 * x[::-1]], axis=1), sr, subtype="FLOAT")
    return x


@pytest.mark.parametrize("sr, seconds", [(16000, 3.1), (44100, 2.9), (8009, 2.0), (16000, 0.009), (16000, 0.026)])
def test_windows_equal_the_whole_file(tmp_path, monkeypatch, sr, seconds):
    """Samples read in blocks (and resampled by block: torchaudio's polyphase filter, or soxr for 8009 Hz) and
    log-mel made window by window equal `read_audio` and `LogMelSpectrogram` of the whole file; lengths under half
    a window (144 samples) and just over it take the whole-file path's edge rules."""
    monkeypatch.setattr(long_audio, "BLOCK_SAMPLES", 997)  # many blocks, none on a period boundary
    path = tmp_path / "a.wav"
    _recording(path, seconds, sr)
    whole = read_audio(path, 16000)
    streamed = np.concatenate(list(long_audio.stream_samples(path, 16000)))
    assert streamed.shape == whole.shape and np.abs(streamed - whole.numpy()).max() <= 1e-6
    frontend = LogMelSpectrogram(16000)
    want = frontend(whole)
    for window in (1, 7, 64, 10_000):
        got = torch.cat(list(long_audio.lms_windows(iter(np.array_split(whole.numpy(), 5)), frontend, window)), -1)
        assert got.shape == want.shape and (got - want).abs().max() <= 2e-5, window


def test_embed_reads_a_long_file_in_windows_equal_to_the_whole_file(tiny_run, tmp_path, monkeypatch):
    """`embed` of a recording longer than a window (here 2 chunks of 64 frames) never decodes it whole, and writes
    the frames, clip embedding and timestamps `Runtime.encode` gives for the whole file; a short file beside it
    takes the batched path."""
    from fastm2d import load_encoder
    monkeypatch.setattr(long_audio, "WINDOW_CHUNKS", 2)
    monkeypatch.setattr(long_audio, "BLOCK_SAMPLES", 4001)
    long_file, short_file = tmp_path / "long.wav", tmp_path / "short.wav"
    _recording(long_file, 9.3, 44100)
    _recording(short_file, 1.0, 16000)
    rt = load_encoder(tiny_run)
    rt.precision = "fp32"
    whole = read_audio(long_file, 16000)
    with torch.no_grad():
        want = rt.encode(whole[None], 16000)[0]
    want_times = rt.frame_times_ms(rt.frontend.num_frames(len(whole))).numpy()
    import fastm2d.frontend as frontend
    decode = frontend.decode_audio

    def whole_file_refused(raw, name, *a, **k):
        assert getattr(name, "name", "") != long_file.name, "the long file was decoded whole"
        return decode(raw, name, *a, **k)
    monkeypatch.setattr(frontend, "decode_audio", whole_file_refused)
    monkeypatch.setenv("FASTM2D_PRECISION", "fp32")
    for level in ("frame", "clip", "timestamp"):
        out = tmp_path / level
        assert main(["embed", "--weights", str(tiny_run), "--out", str(out), "--level", level, "--quiet",
                     "--workers", "0", str(long_file), str(short_file)]) == 0
        rows = {json.loads(r)["file"]: json.loads(r) for r in (out / "manifest.jsonl").read_text().splitlines()}
        row = rows[str(long_file)]
        got = np.load(out / row["array"])
        assert row["seconds"] == pytest.approx(len(whole) / 16000)
        if level == "clip":
            assert np.abs(got - want.mean(0).numpy()).max() <= 1e-4 * np.abs(got).max()
        else:
            assert got.shape == tuple(want.shape) == tuple(row["shape"])
            assert np.abs(got - want.numpy()).max() <= 1e-4 * np.abs(want.numpy()).max()
        if level == "timestamp":
            assert np.allclose(np.load(out / row["timestamps"]), want_times)
        assert np.load(out / rows[str(short_file)]["array"]).shape[-1] == rt.feature_dim


def test_encode_lms_bounds_the_chunks_per_forward(monkeypatch):
    """An hour in memory once went through the encoder in one batch (9.9 GB): whole chunks now go
    CHUNKS_PER_FORWARD at a time, the features those of each chunk encoded alone."""
    import fastm2d.transfer.runtime as runtime_module
    from fastm2d.model import ViTEncoder

    from .conftest import tiny_model_config
    monkeypatch.setattr(runtime_module, "CHUNKS_PER_FORWARD", 3)
    rt = runtime_module.Runtime(ViTEncoder(tiny_model_config()).eval())
    seen = []
    forward = rt.encoder.encode_patches
    monkeypatch.setattr(rt.encoder, "encode_patches", lambda x, **k: seen.append(x.shape[0]) or forward(x, **k))
    lms = torch.randn(2, 1, 80, 64 * 5 + 20)
    with torch.no_grad():
        got = rt.encode_lms(lms)
        want = torch.cat([rt.encode_lms(lms[..., a:a + 64]) for a in range(0, 64 * 5, 64)]
                         + [rt.encode_lms(lms[..., 320:])], dim=1)
    assert max(seen) <= 3 and torch.allclose(got, want, atol=1e-5)


def test_tag_streams_a_long_recording(tmp_path, monkeypatch):
    """`tag` (clip and --frames) of a recording longer than a window equals the tagger on the whole file."""
    from fastm2d import load_classifier
    from fastm2d.transfer.classifier import tag_files

    from .test_released_models import RELEASES, build_release
    monkeypatch.setattr(long_audio, "WINDOW_CHUNKS", 1)  # a 10 s chunk: 23 s is three windows
    folder, file, kind, extras = RELEASES[1]
    path, *_ = build_release(tmp_path / "w", folder, file, kind, extras)
    tagger = load_classifier(path)
    tagger.runtime.precision = "fp32"
    wav_file = tmp_path / "long.wav"
    _recording(wav_file, 23.0, 16000)
    whole = read_audio(wav_file, 16000)[None]
    with torch.no_grad():
        clip = tagger.scores(whole, 16000)[0]
        frames, times = tagger.frame_scores(whole, 16000)
    monkeypatch.setenv("FASTM2D_PRECISION", "fp32")
    [row] = tag_files(tagger, [wav_file], topk=3, workers=0, progress=False)
    assert row["labels"] == [tagger.classes[i] for i in clip.topk(3).indices.tolist()]
    assert np.allclose(row["scores"], clip.topk(3).values.numpy(), atol=1e-4)
    rows = tag_files(tagger, [wav_file], topk=1, frames=True, workers=0, progress=False)
    assert [r["time_ms"] for r in rows] == [round(float(t), 1) for t in times]
    assert np.allclose([r["scores"][0] for r in rows], frames[0].max(-1).values.numpy(), atol=1e-4)


def test_a_long_file_is_never_held_whole(tiny_run, tmp_path, monkeypatch):
    """Ten minutes at 16 kHz decode to 38 MB of float32; window by window the largest array numpy holds at once
    (tracemalloc counts numpy's buffers) stays a few MB, whatever the length."""
    monkeypatch.setattr(long_audio, "WINDOW_CHUNKS", 4)
    path = tmp_path / "ten_minutes.wav"
    n = 16000 * 600
    t = np.arange(n, dtype=np.float32) / 16000
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, subtype="PCM_16")
    del t
    from fastm2d import load_encoder
    rt = load_encoder(tiny_run)
    tracemalloc.start()
    try:
        frames = sum(len(w.layers[0]) for w in long_audio.encode_file(rt, path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert frames == rt.encode_lms(torch.zeros(1, 1, 80, n // 160 + 1)).shape[1]
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MB held at once"


def test_a_cut_long_wav_is_refused_as_read_audio_refuses_it(tiny_run, tmp_path, monkeypatch, capsys):
    """A WAV cut short (its data chunk promises more than the file holds): libsndfile reads what is there without a
    word, so the windowed reader checks the RIFF header as `read_audio` does; `embed` lists the file as failed and
    writes no array, where it once wrote the cut recording's features."""
    monkeypatch.setattr(long_audio, "WINDOW_CHUNKS", 1)
    path = tmp_path / "cut.wav"
    t = np.arange(16000 * 4) / 16000
    sf.write(str(path), (0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 16000, subtype="PCM_16")
    path.write_bytes(path.read_bytes()[:-20000])
    with pytest.raises(AudioReadError, match="truncated"):
        read_audio(path, 16000)
    assert long_audio.is_long(__import__("fastm2d").load_encoder(tiny_run), path)
    out = tmp_path / "feats"
    good = tmp_path / "good.wav"  # beside it, read as usual
    _recording(good, 1.0, 16000)
    assert main(["embed", "--weights", str(tiny_run), "--out", str(out), "--quiet", "--workers", "0", str(path),
                 str(good)]) == 0
    assert "truncated" in capsys.readouterr().err and not (out / "cut.npy").exists() and (out / "good.npy").exists()
