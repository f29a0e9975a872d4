"""M2D-X background noise: the stream's order, tiling, and the on-device mix against eq. 5 in float64."""
import numpy as np
import pytest
import torch

from fastm2d.config import ConfigError, load_config
from fastm2d.data.noise import NoisePicker, tile_crop
from fastm2d.train import Trainer, pretrain, read_metrics


def test_picker_reshuffles_when_exhausted_and_is_deterministic():
    p = NoisePicker(7, seed=3)
    first = [p.pick(k)[0] for k in range(7)]
    second = [p.pick(k)[0] for k in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    assert [NoisePicker(7, seed=3).pick(k) for k in range(14)] == [p.pick(k) for k in range(14)]


def test_short_noise_is_tiled_not_padded():
    clip = np.arange(80 * 10, dtype=np.float32).reshape(80, 10)
    out = tile_crop(clip, 64, np.random.default_rng(0))
    assert out.shape == (80, 64)
    start = int(np.where(clip[0] == out[0, 0])[0][0])
    assert np.array_equal(out[0], np.tile(clip[0], 8)[start:start + 64])


def test_mix_on_device_is_eq5_with_each_sets_mean(tiny_config):
    tr = Trainer(tiny_config("data.noise.train=synthetic", "data.noise.eta=0.3", "data.norm_stats=[-9,3.5]",
                             "data.noise.norm_stats=[-11,2]", "train.max_steps=2"))
    item = tr.data.dataset[(2, 12345, 5)]
    x, bg = item["lms"].double(), item["bg"].double()
    assert bg.shape == x.shape and not torch.equal(x, bg)
    expected = torch.log(0.7 * torch.exp(x + 9) + 0.3 * torch.exp(bg + 11)) / 3.5
    got = tr.on_device(item["lms"][None], item["bg"][None])[0]
    assert torch.allclose(got.double(), expected, atol=1e-4)
    # The same sample number always gets the same background crop (workers, resume).
    assert torch.equal(tr.data.dataset[(4, 1, 5)]["bg"], item["bg"])


def test_training_with_noise_runs_and_the_noise_needs_data(tiny_config):
    tr = pretrain(tiny_config("data.noise.train=synthetic", "data.noise.eta=0.2", "train.max_steps=2"))
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tr.out_dir))
    assert (tr.out_dir / "noise_stats.json").is_file()
    with pytest.raises(ConfigError, match="data.noise.train"):
        load_config(None, ["data.noise.eta=0.3"])


def test_noise_statistics_of_short_clips_come_from_tiled_crops(tmp_path, tiny_config):
    """1 s noise clips under a 6.1 s crop: the noise mean must be the clips' own (tiled, as training mixes them),
    not that of crops mostly made of padding (the reported bug: -0.83 instead of -4.97)."""
    import json

    from tests.conftest import write_tone
    noise = tmp_path / "noise"
    noise.mkdir()
    for i in range(4):
        write_tone(noise / f"n{i}.wav", seconds=1.0, freq=500 + 200 * i)
    tr = Trainer(tiny_config(f"data.noise.train={noise}", "data.noise.eta=0.3", "data.norm_stats=[-9,3.5]",
                             "model.input_size=[80,608]", "data.synthetic_seconds=6.1", "data.synthetic_clips=8"))
    got = json.loads((tr.out_dir / "noise_stats.json").read_text())["norm_stats"][0]
    clips = np.concatenate([tr.data.noise.load(i) for i in range(4)], axis=1).astype(np.float64)
    assert got == pytest.approx(clips.mean(), abs=0.25)  # tiling covers each clip ~6 times, plus a random part
    assert tr.data.noise_mean == pytest.approx(got)
