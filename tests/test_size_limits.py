"""Sizes a file declares are checked before memory is spent on them: checkpoints that describe a gigantic model,
zip members that inflate, awkward sample rates, and long files read by the crop's window."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest
import soundfile as sf
import torch

from fastm2d.checkpoint import CheckpointError

from .conftest import TINY_TRAIN

RSS_PROBE = """
import resource, sys
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
{body}
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def _peak_mib_of(body: str) -> int:
    """Peak resident memory growth (MiB) of `body`, run after `import torch, fastm2d` in a fresh process."""
    code = RSS_PROBE.format(body=body).replace("before =", "import torch, fastm2d, fastm2d.frontend\nbefore =", 1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_a_tiny_checkpoint_describing_a_huge_model_is_refused_before_it_is_built(tmp_path):
    from fastm2d import load_encoder
    path = tmp_path / "big.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 64)}, "model_config": {"size": "base", "embed_dim": 2**20}},
               path)
    assert path.stat().st_size < 4096
    with pytest.raises(CheckpointError, match=r"big.pth: .*parameters, over the limit"):
        load_encoder(path)
    # An original-layout file whose cls_token is a stride-0 view claiming 2**30 channels (a few bytes stored)
    folder = tmp_path / "m2d_vit_base-80x608p16x16-221006-mr7"
    folder.mkdir()
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 1).expand(1, 1, 2**30), "blocks.0.norm1.weight":
                          torch.zeros(1)}}, folder / "checkpoint-300.pth")
    assert (folder / "checkpoint-300.pth").stat().st_size < 4096
    peak = _peak_mib_of(f"""
from fastm2d import load_encoder
from fastm2d.checkpoint import CheckpointError
try:
    load_encoder({str(folder / 'checkpoint-300.pth')!r})
    sys.exit('loaded')
except CheckpointError as e:
    assert 'over the limit' in str(e), e
""")
    assert peak < 200, f"{peak} MiB spent before refusing"


def test_a_zip_member_that_inflates_is_refused_before_decompression(tmp_path):
    from fastm2d.checkpoint import safe_load
    real = tmp_path / "real.pth"
    torch.save({"model": {"w": torch.zeros(4)}}, real)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(real) as z, zipfile.ZipFile(bomb, "w") as out:
        for info in z.infolist():
            data = z.read(info)
            if info.filename.endswith("/data/0"):
                data = bytes(200 * 2**20)  # 200 MiB of zeros deflate to about 200 KiB
            out.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 2 * 2**20
    with pytest.raises(CheckpointError, match=r"bomb.pth: refused to load: member .*data/0 inflates"):
        safe_load(bomb)
    assert safe_load(real)["model"]["w"].shape == (4,)


def test_an_awkward_sample_rate_resamples_in_bounded_memory(tmp_path):
    """8009 Hz (prime): torchaudio's polyphase kernel would take +2 GB; the result matches scipy's polyphase."""
    from scipy.signal import resample_poly

    from fastm2d.frontend import read_audio
    t = np.arange(3 * 8009) / 8009
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(str(tmp_path / "odd.wav"), x, 8009, subtype="FLOAT")
    got = read_audio(tmp_path / "odd.wav", 16000).numpy()
    ref = resample_poly(x.astype(np.float64), 16000, 8009)
    assert got.shape == (48000,) and np.abs(got[400:-400] - ref[400:-400]).max() < 1e-3
    peak = _peak_mib_of(f"fastm2d.frontend.read_audio({str(tmp_path / 'odd.wav')!r}, 16000)")
    assert peak < 300, f"{peak} MiB for 3 s of audio"


def test_embed_goes_on_past_a_file_at_an_absurd_rate(tmp_path, capsys):
    from fastm2d.cli import main
    run = tmp_path / "run"
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=1"]) == 0
    sf.write(str(tmp_path / "fast.wav"), np.zeros(2_100_000, dtype=np.float32), 2_100_000, subtype="FLOAT")
    sf.write(str(tmp_path / "prime.wav"), np.zeros(999_983, dtype=np.float32), 999_983, subtype="FLOAT")
    sf.write(str(tmp_path / "ok.wav"), np.zeros(16000, dtype=np.float32), 16000)
    assert main(["embed", "--weights", str(run), "--out", str(tmp_path / "f"), str(tmp_path / "fast.wav"),
                 str(tmp_path / "prime.wav"), str(tmp_path / "ok.wav")]) == 0
    assert "fast.wav: sample rate 2100000 Hz" in capsys.readouterr().err
    assert (tmp_path / "f" / "ok.npy").exists()
    assert np.load(tmp_path / "f" / "prime.npy").shape[0] == 7  # 1 s at 999,983 Hz resampled (torchaudio raised)


def test_long_files_are_read_by_the_crops_window(tmp_path):
    """A 3-minute 44.1 kHz stereo WAV: every crop equals the same window of the whole file's log-mel (to float32
    rounding) while the decoder touches only the window's samples."""
    import tracemalloc

    from fastm2d.data.dataset import LogMelSource, crop_clip
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal((180 * 44100, 2))).astype(np.float32)
    x[:, 0] += 0.3 * np.sin(np.arange(len(x)) * 2 * np.pi * 330 / 44100).astype(np.float32)
    path = tmp_path / "long.wav"
    sf.write(str(path), x, 44100, subtype="PCM_16")
    source = LogMelSource([path], pad_to=(208 + 2) * 160)
    whole = source.load(0)
    for seed in range(8):
        got, start = source.crop(0, 208, np.random.default_rng(seed))
        ref, ref_start = crop_clip(whole, 208, np.random.default_rng(seed))
        assert start == ref_start
        np.testing.assert_allclose(got, ref, atol=1e-5)
    tracemalloc.start()
    source.crop(0, 208, np.random.default_rng(99))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 * 2**20, f"{peak / 2**20:.1f} MiB traced for one 2 s crop of a {x.nbytes / 2**20:.0f} MiB file"


def test_nan_weights_and_bad_metadata_are_one_line(tmp_path, capsys):
    from fastm2d.cli import main
    run = tmp_path / "run"
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=1"]) == 0
    ckpt = run / "checkpoint-1.pth"
    state = torch.load(ckpt, weights_only=True)
    bad = dict(state, model={**state["model"], "blocks.0.mlp.fc1.weight":
                             torch.full_like(state["model"]["blocks.0.mlp.fc1.weight"], float("nan"))})
    torch.save(bad, tmp_path / "nan.pth")
    torch.save(dict(state, sample_rate="abc"), tmp_path / "rate.pth")
    out = tmp_path / "o"
    for name, words in (("nan.pth", "blocks.0.mlp.fc1.weight holds NaN"), ("rate.pth", "sample_rate='abc'")):
        capsys.readouterr()
        assert main(["embed", "--weights", str(tmp_path / name), "--out", str(out), "x.wav"]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state["model"].items()}, str(tmp_path / "meta.safetensors"),
              metadata={"model_config": "{not json", "sample_rate": "16000"})
    assert main(["embed", "--weights", str(tmp_path / "meta.safetensors"), "--out", str(out), "x.wav"]) == 2
    assert "unreadable safetensors metadata" in capsys.readouterr().err
    torch.save(dict(state, epoch=-3), ckpt)
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=2", "--resume"]) == 2
    assert "epoch=-3" in capsys.readouterr().err
