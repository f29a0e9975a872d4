"""Waveform in, features or tags out, in one ONNX graph (`export --format onnx` -> m2d_waveform.onnx): checked in
onnxruntime against `Runtime.encode` / `Tagger.scores` on recorded sound of several lengths, lengths of one,
several and partial chunks included; the matrix front end against the STFT one training uses."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastm2d.cli import main
from fastm2d.frontend import LogMelByMatrices, LogMelSpectrogram

ort = pytest.importorskip("onnxruntime", reason="running the export needs onnxruntime (the onnx extra)")
pytest.importorskip("onnxscript", reason="exporting needs onnx and onnxscript (the onnx extra)")


def _real_or_noise(seconds: float) -> np.ndarray:
    """Recorded sound (LMMS's samples, when fetched: benchmarks/real_sounds.py) joined to `seconds` at 16 kHz, or
    tones with noise."""
    from .test_long_audio import _recording
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        x = _recording(Path(d) / "r.wav", seconds, 16000)
    return x.astype(np.float32)


def test_the_matrix_front_end_equals_the_stft_one():
    """LogMelByMatrices (a strided Conv1d DFT and the mel matrix, for ONNX) against a float64 STFT log-mel written
    here: within the tolerance rule of LogMelSpectrogram's own float32 error (torch.stft), on recorded sound (whose
    quiet high bands sit near the log floor), on near-silence and on the shortest input."""
    from fastm2d.frontend import LOG_EPS

    from .conftest import assert_tolerance_rule
    frontend = LogMelSpectrogram(16000)
    matrices = LogMelByMatrices(frontend)

    def exact(wav):
        power = torch.stft(wav.double(), 400, 160, 400, torch.hann_window(400, dtype=torch.float64), center=True,
                           pad_mode="reflect", return_complex=True).abs() ** 2
        return torch.log(frontend.mel.mel_scale.fb.double().T @ power + LOG_EPS)
    quiet = torch.zeros(1, 16000)
    quiet[0, 8000:] = torch.randn(8000) * 1e-4
    for wav in (torch.from_numpy(_real_or_noise(4.0))[None], quiet, torch.randn(2, 201) * 0.1):
        got = matrices(wav)
        assert got.shape == frontend(wav).shape
        assert_tolerance_rule(got, frontend(wav), exact(wav), atol=1e-5, what="matrix front end")


@pytest.mark.parametrize("input_frames", [608, 1001])
def test_waveform_graph_equals_encode_on_recorded_sound(tmp_path, input_frames):
    """The exported graph on clips of 0.3 s, 3 s, exactly one chunk, 10 s (1.6 chunks), 19.99 s and 31 s (several,
    the last partial) equals Runtime.encode in fp32 within 1e-4 of the features' scale; the same frame count as
    Runtime.frame_times_ms. 80x1001 is the grid that leaves each chunk's last 9 frames unseen."""
    from fastm2d.checkpoint import atomic_save
    from fastm2d.model import M2D
    from fastm2d.transfer.runtime import load_encoder

    from .conftest import tiny_model_config
    torch.manual_seed(3)
    m = M2D(tiny_model_config(input_size=[80, input_frames]))
    m.norm_stats.copy_(torch.tensor([-8.0, 4.0]))
    weights = tmp_path / "w" / "checkpoint-1.pth"
    atomic_save({"model": m.state_dict(), "model_config": vars(m.cfg), "epoch": 1}, weights)
    assert main(["export", "--weights", str(weights), "--out", str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    front = json.loads((tmp_path / "onnx" / "frontend.json").read_text())
    session = ort.InferenceSession(str(tmp_path / "onnx" / front["waveform_graph"].split(":")[0]))
    rt = load_encoder(weights)
    rt.precision = "fp32"
    sound = _real_or_noise(32.0)
    unit = input_frames * 160
    for n in (4800, 48000, unit - 160, unit, 160000, 319840, 31 * 16000):
        wav = np.stack([sound[:n], sound[-n:]])
        got = session.run(None, {"waveform": wav})[0]
        with torch.no_grad():
            want = rt.encode(torch.from_numpy(wav), 16000).numpy()
        assert got.shape == want.shape, n
        assert got.shape[1] == len(rt.frame_times_ms(rt.frontend.num_frames(n)))
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), n


def test_waveform_graph_of_a_tagger_gives_its_scores(tmp_path):
    """Weights with a head: the graph's second output is Tagger.scores (sigmoid of the head over the time mean),
    on a clip longer than a chunk."""
    from fastm2d import load_classifier

    from .test_released_models import RELEASES, build_release
    folder, file, kind, extras = RELEASES[1]  # an AS-FT file: 80x1001, a 527-class head
    path, *_ = build_release(tmp_path / "w", folder, file, kind, extras)
    assert main(["export", "--weights", str(path), "--out", str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    session = ort.InferenceSession(str(tmp_path / "onnx" / "m2d_waveform.onnx"))
    tagger = load_classifier(path)
    tagger.runtime.precision = "fp32"
    wav = _real_or_noise(13.0)[None]
    frames, scores = session.run(None, {"waveform": wav})
    with torch.no_grad():
        want = tagger.scores(torch.from_numpy(wav), 16000).numpy()
        want_frames = tagger.runtime.encode(torch.from_numpy(wav), 16000).numpy()
    assert scores.shape == (1, 527) and np.abs(scores - want).max() < 1e-4
    assert frames.shape == want_frames.shape


def test_encode_chunks_as_the_original_when_padding_crosses_a_chunk(tmp_path):
    """80x1001 at 16x16 and 2000 frames: the original counts ceil(2000 / 1001) = 2 chunks before padding to whole
    patches (portable_m2d.py encode_lms, l. 412-415), so the 9 padding frames that cross into a third chunk start
    none; a 7-frame third chunk once made the patch convolution fail."""
    from fastm2d.model import ViTEncoder
    from fastm2d.transfer.runtime import Runtime

    from .conftest import tiny_model_config
    rt = Runtime(ViTEncoder(tiny_model_config(input_size=[80, 1001])).eval())
    lms = torch.randn(1, 1, 80, 2000)
    padded = torch.nn.functional.pad(lms, (0, 9))
    with torch.no_grad():
        got = rt.encode_lms(lms)
        chunks = [rt.encoder.encode_patches(padded[..., i * 1001:(i + 1) * 1001]) for i in range(2)]
    want = torch.cat([z.reshape(1, 5, 62, 64).transpose(1, 2).flatten(2) for z in chunks], dim=1)
    assert got.shape == want.shape == (1, 124, 320) and torch.allclose(got, want, atol=1e-5)
    assert len(rt.frame_times_ms(2000)) == 124
