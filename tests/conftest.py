"""Shared fixtures: tiny model configs that run in milliseconds, and audio files written on the fly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastm2d.config import Config, ModelConfig, load_config


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(size="tiny", embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=2, input_size=[80, 64], patch_size=[16, 16])
    base.update(kw)
    return ModelConfig(**base).resolved()


TINY_TRAIN = [
    "model.size=tiny", "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32",
    "model.decoder_depth=1", "model.decoder_num_heads=2", "model.input_size=[80,64]",
    "data.synthetic_clips=32", "data.synthetic_seconds=1.0", "data.num_workers=0", "data.stats_items=16",
    "train.batch_size=4", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
]


@pytest.fixture
def tiny_config(tmp_path):
    def make(*overrides) -> Config:
        return load_config(None, [f"out_dir={tmp_path / 'run'}", *TINY_TRAIN, *overrides])
    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def write_tone(path, seconds=1.0, sr=16000, channels=1, freq=440.0, fmt=None):
    import soundfile as sf
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(0).standard_normal(len(t))
    data = np.stack([x * (c + 1) / channels for c in range(channels)], axis=1) if channels > 1 else x
    sf.write(str(path), data.astype(np.float32), sr, format=fmt)
    return path
