"""The DALI raw-audio pipeline, run with DALI's CPU operators, against the reference front end."""
import numpy as np
import pytest
import torch

from fastm2d.data.dali import dali_missing_reason
from fastm2d.frontend import LogMelSpectrogram, read_audio


pytestmark = pytest.mark.skipif(dali_missing_reason() is not None, reason=str(dali_missing_reason()))


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    import soundfile as sf
    out = []
    for i, (sec, sr, ch) in enumerate([(7.0, 16000, 1), (6.3, 16000, 2), (0.5, 16000, 1), (2.0, 22050, 1)]):
        t = np.arange(int(sec * sr)) / sr
        x = 0.3 * np.sin(2 * np.pi * (300 + 250 * i) * t) + 0.05 * rng.standard_normal(len(t))
        data = np.stack([x, 0.5 * x], 1) if ch == 2 else x
        path = tmp_path / f"f{i}.{'flac' if ch == 2 else 'wav'}"
        sf.write(str(path), data.astype(np.float32), sr)
        out.append(str(path))
    return out


def test_full_length_equals_log_mel_spectrogram_at_the_native_rate(files):
    from fastm2d.data.dali import build_pipeline
    pipe = build_pipeline(files, batch_size=len(files), crop_frames=None, shuffle=False, num_threads=1)
    out = pipe.run()[0]
    fe = LogMelSpectrogram(16000)
    for i, f in enumerate(files):
        dali = np.asarray(out[i])
        ref = fe(read_audio(f, 16000)).numpy()
        assert dali.shape == ref.shape, f
        if i < 3:  # 16 kHz inputs (mono, stereo FLAC, short): the spectral chain matches to float32 noise
            np.testing.assert_allclose(dali, ref, atol=1e-3, err_msg=f)
        else:  # resampled: DALI's resampler is not torchaudio's; same frames, close low bands on average
            assert np.isfinite(dali).all()
            assert np.abs(dali.mean(1)[:40] - ref.mean(1)[:40]).mean() < 0.5


def test_cropped_batches_on_the_loader(files):
    from fastm2d.data.dali import DaliLogMelLoader
    loader = DaliLogMelLoader(files[:3], batch_size=3, device=torch.device("cpu"), crop_frames=608, num_threads=1,
                              seed=1)
    (batch,) = list(loader)
    assert batch.shape == (3, 1, 80, 608) and torch.isfinite(batch).all()
    # The 0.5 s clip (51 frames) is zero-padded at the end in the log domain, as the reference crop does.
    full = LogMelSpectrogram()(read_audio(files[2], 16000))
    short = [b for b in batch if (b[0, :, 51:] == 0).all()]
    assert len(short) == 1 and torch.allclose(short[0][0, :, :51], full, atol=1e-3)
    assert len(list(loader)) == 1  # a second epoch


def test_trainer_with_the_dali_loader(files, tiny_config):
    from fastm2d.train import pretrain, read_metrics
    folder = str(__import__("pathlib").Path(files[0]).parent)
    tr = pretrain(tiny_config(f"data.train={folder}", "data.loader=dali", "train.batch_size=2", "train.max_steps=2",
                              "data.norm_stats=[-8,4]"))
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tr.out_dir))


def test_missing_dali_is_a_clear_start_up_error(files, tiny_config, monkeypatch):
    import fastm2d.data.dali as dali
    from fastm2d.config import ConfigError
    from fastm2d.train import Trainer
    monkeypatch.setattr(dali, "dali_missing_reason", lambda: "NVIDIA DALI is not installed (pip install ...)")
    folder = str(__import__("pathlib").Path(files[0]).parent)
    with pytest.raises(ConfigError, match="data.loader=dali: NVIDIA DALI is not installed"):
        Trainer(tiny_config(f"data.train={folder}", "data.loader=dali"))
    with pytest.raises(RuntimeError, match="DALI loader was requested, but NVIDIA DALI is not installed"):
        dali.DaliLogMelLoader(files, 2, torch.device("cpu"))


def test_dali_refuses_log_mel_inputs_at_start_up(tmp_path, tiny_config):
    from fastm2d.config import ConfigError
    from fastm2d.train import Trainer
    np.save(tmp_path / "a.npy", np.random.randn(1, 80, 100).astype(np.float32))
    with pytest.raises(ConfigError, match="data.loader=dali decodes audio files"):
        Trainer(tiny_config(f"data.train={tmp_path}", "data.loader=dali", "data.norm_stats=[-8,4]"))
