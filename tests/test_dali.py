"""The DALI raw-audio pipeline, run with DALI's CPU operators, against the reference front end."""
import numpy as np
import pytest
import torch

from fastm2d.data.dali import dali_missing_reason
from fastm2d.frontend import SILENCE_LOG, LogMelSpectrogram, pad_samples, read_audio


pytestmark = pytest.mark.skipif(dali_missing_reason() is not None, reason=str(dali_missing_reason()))


def _reference(path, crop_frames=608):
    """LogMelSpectrogram of the waveform zero-padded by the short-clip rule (6.1 s for the 608-frame crop),
    written out here."""
    wav = read_audio(path, 16000)
    n = pad_samples(16000, crop_frames)
    assert n == 97600 or crop_frames != 608
    if len(wav) < n:
        wav = torch.cat([wav, torch.zeros(n - len(wav))])
    return LogMelSpectrogram(16000)(wav).numpy()


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
    pipe = build_pipeline(files, batch_size=len(files), crop_frames=None, shuffle=False, num_threads=1, pad_for=608)
    out = pipe.run()[0]
    for i, f in enumerate(files):
        dali = np.asarray(out[i])
        ref = _reference(f)
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
    # The 0.5 s clip was padded as a waveform to 6.1 s (611 frames); its crop is a window of that, and the
    # frames past the audio are the log-mel of silence, not 0.
    full = torch.from_numpy(_reference(files[2]))
    assert full.shape[1] == 611 and torch.allclose(full[:, 60:], torch.tensor(SILENCE_LOG), atol=1e-3)
    short = [b[0] for b in batch if torch.allclose(b[0, :, 100:], torch.tensor(SILENCE_LOG), atol=1e-3)]
    assert len(short) == 1
    assert any(torch.allclose(short[0], full[:, s:s + 608], atol=1e-3) for s in range(4))
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


def test_a_short_clip_is_padded_alike_on_every_path(tmp_path):
    """One 0.8 s clip through the reference loader, a prepared store and DALI: the same full log-mel (waveform
    zero-padded to 6.1 s, as the original's preparation), hence the same crops and statistics everywhere."""
    from fastm2d.data import LogMelSource, LogMelStore
    from fastm2d.data.dali import build_pipeline
    from fastm2d.data.prepare import prepare
    from tests.conftest import write_tone
    (tmp_path / "src").mkdir()
    clip = write_tone(tmp_path / "src" / "short.wav", seconds=0.8)
    reference = LogMelSource([clip], pad_to=pad_samples(16000, 608), min_samples=2560, min_frames=16).load(0)
    prepare(str(tmp_path / "src"), tmp_path / "store", workers=1, dtype="float32", progress=False, stats_items=1)
    stored = LogMelStore(tmp_path / "store")[0]
    dali = np.asarray(build_pipeline([str(clip)], 1, crop_frames=None, shuffle=False, num_threads=1,
                                     pad_for=608).run()[0][0])
    written_out = _reference(clip)  # the rule, computed independently in this file
    assert reference.shape == stored.shape == dali.shape == written_out.shape == (80, 611)
    np.testing.assert_allclose(reference, written_out, atol=1e-6)
    np.testing.assert_allclose(stored, written_out, atol=1e-6)
    np.testing.assert_allclose(dali, written_out, atol=1e-3)
    assert np.allclose(written_out[:, 90:], SILENCE_LOG, atol=1e-3)  # silence, which normalises to about -2


RANK_READS = """
import json, sys
import torch
from fastm2d.config import load_config
from fastm2d.train import Trainer
out, overrides = sys.argv[1], sys.argv[2:]
trainer = Trainer(load_config(None, overrides))
files = [str(f) for f in trainer.data.source.files]
epoch = [files[i] for _, index in trainer.data.dali_loader(with_index=True) for i in index.tolist()]
with open(f"{out}/rank{trainer.dist.rank}.json", "w") as f:
    json.dump(epoch, f)
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_each_rank_reads_its_own_shard_and_together_the_list(tmp_path):
    """2 gloo processes (torchrun, DeepSpeed on CPU), each with the trainer's DALI loader on DALI's CPU operators:
    the files each rank reads in an epoch are disjoint and together are the list (before: every rank read the
    whole list in the same order, so the global batch was 2 copies of one batch)."""
    import importlib.util
    import os
    import subprocess
    import sys

    import soundfile as sf

    from .conftest import TINY_TRAIN
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed: the trainer runs several processes on it")
    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        sf.write(str(clips / f"c{i:02d}.wav"), (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    (tmp_path / "reads.py").write_text(RANK_READS)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                        str(tmp_path / "reads.py"), str(tmp_path), *TINY_TRAIN, f"out_dir={tmp_path / 'run'}",
                        f"data.train={clips}", "data.loader=dali", "train.batch_size=2", "data.norm_stats=[-8,4]",
                        "train.engine=deepspeed"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    reads = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert len(reads[0]) == len(reads[1]) == 6
    assert not set(reads[0]) & set(reads[1])
    assert sorted(reads[0] + reads[1]) == sorted(str(p) for p in clips.glob("*.wav"))


def test_dali_threads_take_the_ranks_share_of_the_cores():
    from fastm2d.data.dali import dali_threads
    cores = len(__import__("os").sched_getaffinity(0))
    assert dali_threads(2, 1) == max(2, cores)
    assert dali_threads(64, 8) == 64  # an explicit larger data.num_workers wins
    assert dali_threads(0, 10 * cores) == 1
