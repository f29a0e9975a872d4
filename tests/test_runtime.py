"""Transfer: chunked encoding of any length, eq. 4 frame layout, layers, clip embeddings."""
import pytest
import torch

from fastm2d.checkpoint import atomic_save
from fastm2d.model import M2D
from fastm2d.transfer.runtime import Runtime, load_encoder

from .conftest import tiny_model_config


@pytest.fixture(scope="module")
def runtime():
    torch.manual_seed(0)
    m = M2D(tiny_model_config(input_size=[80, 608], depth=2)).eval()
    return Runtime(m)


def test_ten_seconds_gives_63_frames_of_f_times_d(runtime):
    feats = runtime.encode(torch.randn(2, 160000) * 0.1, 16000)
    assert feats.shape == (2, 38 + 25, 5 * 64)


def test_chunks_equal_separate_encodings_in_eq4_layout(runtime):
    lms = torch.randn(1, 1, 80, 1001)
    feats = runtime.encode_lms(lms)
    enc = runtime.encoder
    # Chunk 1: the first 608 frames; chunk 2: the remaining 393 padded with zeros to 400.
    tail = torch.nn.functional.pad(lms[..., 608:], (0, 7))
    for chunk, frames in ((lms[..., :608], slice(0, 38)), (tail, slice(38, 63))):
        z = enc.encode_patches(chunk)  # (1, 5 * T', D), frequency-major
        n_t = z.shape[1] // 5
        for f in range(5):
            for t in range(n_t):
                assert torch.allclose(feats[0, frames][t, f * 64:(f + 1) * 64], z[0, f * n_t + t], atol=1e-5)


def test_layers_scene_embedding_and_rate_check(runtime):
    wav = torch.randn(2, 32000) * 0.1
    layers = runtime.encode(wav, 16000, return_layers=True)
    assert len(layers) == 2 and torch.allclose(layers[-1], runtime.encode(wav, 16000))
    assert torch.allclose(runtime.scene_embedding(wav, 16000), layers[-1].mean(1))
    with pytest.raises(ValueError, match="16000 Hz.*44100"):
        runtime.encode(wav, 44100)


def test_load_encoder_from_run_folder_and_other_length(tmp_path):
    m = M2D(tiny_model_config(input_size=[80, 608]))
    atomic_save({"model": m.state_dict(), "model_config": vars(m.cfg)}, tmp_path / "run" / "checkpoint-5.pth")
    rt = load_encoder(tmp_path / "run", input_frames=1008)
    assert rt.encoder.pos_embed.shape == (1, 1 + 5 * 63, 64)
    assert rt.encode_lms(torch.randn(1, 1, 80, 1008)).shape == (1, 63, 320)
    short = load_encoder(tmp_path / "run", input_frames=400)
    assert torch.equal(short.encoder.pos_embed[0, 1:26], m.pos_embed[0, 1:26])  # trimmed, not interpolated


def test_one_inference_context_no_autograd_unless_asked(runtime):
    """Runtime.inference() is the context every use of a model runs in: no autograd (embed, tag, zero-shot ...),
    while `encode` keeps the caller's grad mode (s3prl fine-tunes its upstream through it)."""
    wav = torch.randn(1, 16000) * 0.1
    with runtime.inference():
        assert not torch.is_grad_enabled()
        assert not runtime.encode(wav, 16000).requires_grad
    assert runtime.encode(wav, 16000).requires_grad
    with torch.no_grad():
        assert not runtime.encode(wav, 16000).requires_grad
