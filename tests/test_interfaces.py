"""The HEAR 2021 API and s3prl's upstream interface around the Runtime, checked against the interfaces' own rules
(and the published HEAR validator where it can be fetched)."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch


def test_hear_api_shapes_times_and_batching(tiny_run):
    from fastm2d import load_encoder
    from fastm2d.interfaces import hear
    model = hear.load_model(str(tiny_run))
    assert model.sample_rate == 16000 and model.scene_embedding_size == model.timestamp_embedding_size == 5 * 64
    torch.manual_seed(0)
    audio = (torch.rand(hear.BATCH + 3, 16000 * 3) * 2 - 1) * 0.5  # more sounds than one batch
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.shape[:2] == ts.shape and emb.shape[0] == len(audio) and emb.shape[2] == model.timestamp_embedding_size
    # frames of 16 hops (160 ms), centred: 80, 240, ... ms, the same for every sound
    assert ts[0].tolist() == pytest.approx([160 * k + 80 for k in range(ts.shape[1])])
    assert (ts == ts[0]).all()
    rt = load_encoder(tiny_run)
    with torch.no_grad():
        alone = rt.encode(audio[-1:], 16000)  # the last sound on its own, in the second batch
    assert torch.allclose(emb[-1:], alone, atol=1e-5)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (len(audio), model.scene_embedding_size) and torch.allclose(scene, emb.mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="n_sounds, n_samples"):
        hear.get_scene_embeddings(audio[0], model)


def test_hear_load_model_needs_weights(monkeypatch):
    from fastm2d.interfaces import hear
    monkeypatch.delenv("FASTM2D_HEAR_WEIGHTS", raising=False)
    with pytest.raises(ValueError, match="downloads nothing"):
        hear.load_model("")


def _hearvalidator():
    """The published validator (PyPI hearvalidator 2021.0.2), fetched without its tensorflow dependency: its
    PyTorch checks never touch tensorflow but `isinstance(model, tf.Module)`, given here by a stand-in class."""
    cache = Path.home() / ".cache" / "fastm2d" / "hearvalidator"
    wheels = sorted(cache.glob("hearvalidator-2021.0.2-*.whl"))
    if not wheels:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "hearvalidator==2021.0.2",
                            "-d", str(cache)], capture_output=True, text=True, timeout=120)
        wheels = sorted(cache.glob("hearvalidator-2021.0.2-*.whl"))
        if r.returncode or not wheels:
            pytest.skip(f"hearvalidator cannot be fetched from PyPI here: {r.stderr.strip()[-200:]}")
    return wheels[0]


def test_the_published_hear_validator_passes(tiny_run, monkeypatch):
    wheel = _hearvalidator()
    monkeypatch.syspath_prepend(str(wheel))  # a pure-Python wheel imports as a zip
    if "tensorflow" not in sys.modules:
        monkeypatch.setitem(sys.modules, "tensorflow", types.SimpleNamespace(Module=type("Module", (), {})))
    from hearvalidator.validate import ValidateModel
    ValidateModel("fastm2d.interfaces.hear", str(tiny_run), device="cpu")()  # raises ModelError on any failure


def test_s3prl_upstream_handles_padding_and_reports_its_rate(tiny_run):
    from fastm2d import load_encoder
    from fastm2d.interfaces.s3prl import UpstreamExpert, m2d_local
    expert = m2d_local(str(tiny_run))
    assert isinstance(expert, UpstreamExpert) and expert.get_downsample_rates("hidden_states") == 2560
    torch.manual_seed(1)
    wavs = [torch.randn(16000 * 2) * 0.1, torch.randn(16000 * 1) * 0.1, torch.randn(16000 * 2) * 0.1]
    out = expert(wavs)
    hidden, last = out["hidden_states"], out["last_hidden_state"]
    assert len(hidden) == 2 and last is hidden[-1] and last.shape[:2] == (3, 13)
    rt = load_encoder(tiny_run)
    with torch.no_grad():
        short = rt.encode(wavs[1][None], 16000, return_layers=True)
    n = short[0].shape[1]
    assert n == 7 and all(torch.allclose(h[1, :n], s[0], atol=1e-5) for h, s in zip(hidden, short))  # as if alone
    assert all((h[1, n:] == 0).all() for h in hidden)  # nothing past its own frames
    assert abs(last.shape[1] * expert.get_downsample_rates("x") - 32000) <= 2560


def test_hubconf_exposes_the_upstream(tiny_run):
    hub = torch.hub.load(str(Path(__file__).resolve().parent.parent), "m2d_local", ckpt=str(tiny_run), source="local")
    assert hub.get_downsample_rates("last_hidden_state") == 2560
