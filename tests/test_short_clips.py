"""Short real clips under short and long crops: frontend.py's rule (pad the waveform to the crop + 20 ms, or tile
with data.repeat_short) on every path: the trainer's own data path, `prepare` + store, DALI, statistics; and a
WAV cut in the middle of its data listed as truncated everywhere.

The sound is real (LMMS's sample library, fetched by `python benchmarks/real_sounds.py fetch`): 1 s cut from
instrument and loop recordings at their own 44.1 kHz rate. Expectations are computed here from the rule's text:
a C-frame crop of a clip shorter than the crop is a window, starting at frame 0-3, of the log-mel of the clip
zero-padded to (C + 2) x 160 samples.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from benchmarks.real_sounds import missing_reason, sound_files
from fastm2d.frontend import SILENCE_LOG, LogMelSpectrogram, read_audio

PACKAGE = "lmms-common"
pytestmark = pytest.mark.skipif(missing_reason(PACKAGE) is not None, reason=str(missing_reason(PACKAGE)))
CROPS = {"2 s": 208, "6 s": 608}  # the demo's 80x208 and the original's 80x608 (16x16 patches)


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory):
    """Four real 1.0 s clips (the first second of the library's longer recordings), as 44.1 kHz WAV files."""
    out = tmp_path_factory.mktemp("real") / "clips"
    out.mkdir()
    picked = []
    for f in sound_files(PACKAGE, "usr/share/lmms/samples"):
        info = sf.info(str(f))
        if info.samplerate == 44100 and info.duration >= 1.5 and f.parent.name in ("instruments", "latin",
                                                                                  "stringsnpads", "bassloops"):
            data, sr = sf.read(str(f), dtype="float32", always_2d=True)
            if np.abs(data[:sr]).max() > 0.05:  # sound in its first second
                picked.append(out / f"{f.parent.name}_{f.stem}.wav")
                sf.write(str(picked[-1]), data[:sr], sr)
        if len(picked) == 4:
            break
    assert len(picked) == 4, "expected at least 4 real recordings of 1.5 s or more in the LMMS library"
    return out, picked


def rule_reference(path, crop: int) -> np.ndarray:
    """The rule, written out: the clip's waveform zero-padded at the end to (crop + 2) hops -> its log-mel."""
    wav = read_audio(path, 16000)
    assert len(wav) == 16000  # 1 s at 16 kHz
    wav = torch.nn.functional.pad(wav, (0, (crop + 2) * 160 - len(wav)))
    return LogMelSpectrogram(16000)(wav).numpy()


def silent_fraction(lms: np.ndarray) -> float:
    """Frames that are the log-mel of digital silence in every bin (padding, or silence inside a recording)."""
    return float(np.mean(np.all(lms <= SILENCE_LOG + 1e-3, axis=0)))


def check_crops(crops, refs, crop: int, atol: float):
    """Each crop is a window of its clip's rule reference starting at frame 0-3, and the padded share of the
    crops equals the rule's (the mean over the 4 equally likely starts) to within one start's difference."""
    for item, lms in crops:
        ref = refs[item]
        assert ref.shape[1] == crop + 3
        errors = [np.abs(lms - ref[:, s:s + crop]).max() for s in range(4)]
        assert min(errors) <= atol, f"crop of item {item} is no window of the padded clip (errors {errors})"
    for item in {i for i, _ in crops}:
        observed = np.mean([silent_fraction(lms) for i, lms in crops if i == item])
        expected = np.mean([silent_fraction(refs[item][:, s:s + crop]) for s in range(4)])
        assert abs(observed - expected) <= 3 / crop + 1e-6, (item, observed, expected)
        assert expected < 1 - 90 / crop  # the whole 1 s clip (about 100 frames) is in every crop


def dataset_crops(trainer, n: int = 24):
    ds = trainer.data.dataset
    return [(k % len(ds), ds[(k % len(ds), 1000 + k, k)]["lms"][0].numpy()) for k in range(n)]


@pytest.mark.parametrize("name", list(CROPS))
def test_the_trainers_data_path_pads_short_real_clips_to_the_crop(real_clips, tiny_config, name):
    from fastm2d.train import Trainer
    crop = CROPS[name]
    src, files = real_clips
    tr = Trainer(tiny_config(f"data.train={src}", f"model.input_size=[80,{crop}]"))  # statistics computed
    names = [str(f) for f in tr.data.source.files]
    refs = {names.index(str(f)): rule_reference(f, crop) for f in files}
    check_crops(dataset_crops(tr), refs, crop, atol=1e-4)
    # The statistics are those of the same crops: the mean over the rule's windows, computed here in float64.
    expected = np.mean([refs[i][:, s:s + crop].astype(np.float64).mean() for i in refs for s in range(4)])
    mean = json.loads((tr.out_dir / "norm_stats.json").read_text())["norm_stats"][0]
    assert abs(mean - expected) < 0.05, (mean, expected)


def test_a_store_serves_each_crop_its_own_padding(real_clips, tiny_config, tmp_path):
    """One store, prepared for the original's 608-frame crop (short clips stored as 6.1 s), read by 208- and
    608-frame training crops: each gets the rule's padding for its own crop."""
    from fastm2d.data import LogMelStore
    from fastm2d.data.prepare import prepare
    from fastm2d.train import Trainer
    src, files = real_clips
    store_dir = tmp_path / "store"
    prepare(str(src), store_dir, workers=1, dtype="float32", stats_items=4, progress=False)
    assert LogMelStore(store_dir)[0].shape == (80, 611)  # the original's 6.1 s
    for crop in CROPS.values():
        tr = Trainer(tiny_config(f"data.train={store_dir}", f"model.input_size=[80,{crop}]", "data.norm_stats=[-8,4]",
                                 f"out_dir={tmp_path / f'run{crop}'}"))
        refs = {tr.data.source.names.index(str(f)): rule_reference(f, crop) for f in files}
        check_crops(dataset_crops(tr), refs, crop, atol=1e-4)


def test_dali_pads_short_real_clips_to_the_crop(real_clips, tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from fastm2d.data.dali import build_pipeline
    crop = CROPS["2 s"]
    files = []  # at the model's rate: DALI's resampler is not torchaudio's (README "Data at scale")
    for f in real_clips[1]:
        files.append(tmp_path / f.name)
        sf.write(str(files[-1]), read_audio(f, 16000).numpy(), 16000, subtype="FLOAT")
    refs = {i: rule_reference(f, crop) for i, f in enumerate(files)}
    pipe = build_pipeline([str(f) for f in files], 1, crop_frames=crop, shuffle=False, num_threads=1, seed=3)
    crops = [(k % len(files), np.asarray(pipe.run()[0][0])) for k in range(4 * len(files))]
    check_crops(crops, refs, crop, atol=1e-3)  # DALI's float32 spectral chain differs from torch's by ~1e-4


def test_repeat_short_tiles_real_clips_instead(real_clips, tiny_config):
    """data.repeat_short (the original's other choice): the clip repeated along time, no padding."""
    from fastm2d.train import Trainer
    src, files = real_clips
    crop = CROPS["2 s"]
    tr = Trainer(tiny_config(f"data.train={src}", f"model.input_size=[80,{crop}]", "data.norm_stats=[-8,4]",
                             "data.repeat_short=true"))
    names = [str(f) for f in tr.data.source.files]
    for item, lms in dataset_crops(tr, 8):
        clip = LogMelSpectrogram(16000)(read_audio(names[item], 16000)).numpy()  # 101 frames, unpadded
        tiled = np.concatenate([clip] * 4, axis=1)
        errors = [np.abs(lms - tiled[:, s:s + crop]).max() for s in range(tiled.shape[1] - crop + 1)]
        assert min(errors) <= 1e-4
        assert silent_fraction(lms) <= silent_fraction(clip) + 2 / clip.shape[1]


def test_a_wav_cut_in_the_middle_of_its_data_is_listed_as_truncated(real_clips, tiny_config, tmp_path, capsys):
    """The header promises 44100 samples, the file holds 22050: pretrain, prepare, stats and embed list it with
    both lengths and leave it out (libsndfile alone reads the half silently)."""
    from fastm2d.cli import main
    from fastm2d.data.prepare import prepare
    src, files = real_clips
    data = tmp_path / "data"
    data.mkdir()
    for f in files:
        (data / f.name).write_bytes(f.read_bytes())
    whole = files[0].read_bytes()
    header = 44  # soundfile writes a plain 44-byte RIFF header for 16-bit PCM
    assert whole[36:40] == b"data"
    (data / "cut.wav").write_bytes(whole[:header + (len(whole) - header) // 2])
    assert sf.info(str(data / "cut.wav")).frames == 22050  # what libsndfile believes
    reason = "truncated: the header promises 44100 samples, the file holds 22050"

    tr_out = tmp_path / "run"
    assert main(["pretrain", f"out_dir={tr_out}", "model.size=tiny", "model.embed_dim=64", "model.depth=1",
                 "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1",
                 "model.decoder_num_heads=2", "model.input_size=[80,64]", f"data.train={data}", "data.num_workers=0",
                 "data.norm_stats=[-8,4]", "train.batch_size=2", "train.max_steps=1", "train.progress=false",
                 "train.tensorboard=false"]) == 0
    assert any("cut.wav" in line and reason in line for line in (tr_out / "bad_training_files.txt").read_text().splitlines())

    prepare(str(data), tmp_path / "store", workers=1, stats_items=2, progress=False)
    failures = (tmp_path / "store" / "failures.tsv").read_text()
    assert any("cut.wav" in line and reason in line for line in failures.splitlines())

    capsys.readouterr()
    assert main(["stats", str(data), "--items", "4"]) == 0
    assert any("cut.wav" in line and reason in line for line in capsys.readouterr().err.splitlines())

    assert main(["embed", "--weights", str(tr_out), "--out", str(tmp_path / "feats"), str(data / "cut.wav"),
                 str(files[1])]) == 0
    err = capsys.readouterr().err
    assert any("cut.wav" in line and reason in line for line in err.splitlines())
    assert not (tmp_path / "feats" / "cut.npy").exists() and (tmp_path / "feats" / f"{files[1].stem}.npy").exists()
