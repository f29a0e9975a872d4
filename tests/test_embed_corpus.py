"""`fastm2d embed` over a corpus: folders, CSV lists and files; mirrored paths and a manifest; clips of one length
batched, each equal to encoding it alone; resumable after a kill; layers; long audio's chunks in one batch."""
from __future__ import annotations

import json

import numpy as np
import torch

from fastm2d.cli import main

from .conftest import write_tone


def _corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "dogs" / "big").mkdir(parents=True)
    (root / "rain").mkdir()
    for i in range(3):
        write_tone(root / "dogs" / f"d{i}.wav", seconds=1.0, freq=200 + 100 * i)  # one length: one batch
    write_tone(root / "dogs" / "big" / "d0.wav", seconds=1.5, freq=700)  # same name, other folder
    write_tone(root / "rain" / "r0.flac", seconds=2.0, freq=900, fmt="FLAC")
    listing = tmp_path / "list.csv"
    write_tone(tmp_path / "extra.wav", seconds=0.7)
    listing.write_text("file_name\nextra.wav\n")
    return root, listing


def test_a_corpus_is_mirrored_with_a_manifest_and_equals_clip_by_clip(tiny_run, tmp_path):
    from fastm2d import load_encoder
    root, listing = _corpus(tmp_path)
    out = tmp_path / "feats"
    assert main(["embed", "--weights", str(tiny_run), "--out", str(out), "--workers", "2", "--quiet", str(root),
                 str(listing)]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    arrays = sorted(r["array"] for r in rows)
    assert arrays == ["dogs/big/d0.npy", "dogs/d0.npy", "dogs/d1.npy", "dogs/d2.npy", "extra.npy", "rain/r0.npy"]
    rt = load_encoder(tiny_run)
    from fastm2d import read_audio
    for r in rows:
        got = np.load(out / r["array"])
        assert list(got.shape) == r["shape"]
        with torch.no_grad():
            alone = rt.encode(read_audio(r["file"], 16000)[None], 16000)[0].numpy()
        assert np.allclose(got, alone, atol=1e-5), r["file"]
        assert r["frame_ms"] == [80.0, 160.0]


def test_embed_resumes_after_a_kill_and_skips_what_is_done(tiny_run, tmp_path, capsys):
    root, _ = _corpus(tmp_path)
    out = tmp_path / "feats"
    args = ["embed", "--weights", str(tiny_run), "--out", str(out), "--workers", "0", "--quiet", str(root)]
    assert main(args) == 0
    full = {p.relative_to(out).as_posix(): np.load(p) for p in out.rglob("*.npy")}
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    # as a kill leaves it: the last clip's array written but its line torn, the one before missing both
    (out / "manifest.jsonl").write_text("".join(lines[:3]) + lines[4][:10])
    (out / json.loads(lines[3])["array"]).unlink()
    capsys.readouterr()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "wrote 2 feature files" in text and "3 already there" in text
    again = {p.relative_to(out).as_posix(): np.load(p) for p in out.rglob("*.npy")}
    assert sorted(again) == sorted(full) and all(np.array_equal(again[k], full[k]) for k in full)
    assert main(args) == 0
    assert "wrote 0 feature files" in capsys.readouterr().out


def test_layers_and_scene_level(tiny_run, tmp_path):
    wav = write_tone(tmp_path / "a.wav", seconds=1.0)
    assert main(["embed", "--weights", str(tiny_run), "--out", str(tmp_path / "l"), "--layers", "0,1", "--quiet",
                 str(wav)]) == 0
    assert np.load(tmp_path / "l" / "a.npy").shape == (7, 2 * 5 * 64)  # 101 frames: 4 + 3 patch columns
    assert main(["embed", "--weights", str(tiny_run), "--out", str(tmp_path / "s"), "--level", "scene", "--quiet",
                 str(wav)]) == 0
    assert np.load(tmp_path / "s" / "a.npy").shape == (5 * 64,)


def test_long_audio_chunks_are_one_batch_equal_to_one_after_another(tiny_run):
    from fastm2d import load_encoder
    rt = load_encoder(tiny_run)
    torch.manual_seed(0)
    lms = torch.randn(2, 1, 80, 64 * 5 + 40)  # 5 whole chunks and a 40-frame tail (padded to 48: 3 patches)
    with torch.no_grad():
        batched = rt.encode_lms(lms, return_layers=True)
        n_f = rt.encoder.grid[0]
        seq, padded = [], torch.nn.functional.pad(lms, (0, 8))
        for start in range(0, padded.shape[-1], 64):
            out = rt.encoder.encode_patches(padded[..., start:start + 64], return_layers=True)
            seq.append([z.reshape(2, n_f, -1, z.shape[-1]).transpose(1, 2).flatten(2) for z in out])
        want = [torch.cat([c[i] for c in seq], dim=1) for i in range(2)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(batched, want))
    assert batched[-1].shape[1] == 5 * 4 + 3


def test_embed_says_where_its_time_goes(tiny_run, tmp_path, capsys):
    """decode and resample (waiting for the loader), front end, encoder, writing: each timed apart, together within
    the command's own wall time."""
    import time

    from fastm2d.cli import main

    from .conftest import write_tone
    (tmp_path / "c").mkdir()
    for i in range(3):
        write_tone(tmp_path / "c" / f"{i}.wav", seconds=1.0 + i, freq=300 + 100 * i)
    t0 = time.perf_counter()
    assert main(["embed", "--weights", str(tiny_run), "--out", str(tmp_path / "o"), str(tmp_path / "c"),
                 "--quiet", "--workers", "0"]) == 0
    wall = time.perf_counter() - t0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("time: ")][0]
    import re
    parts = dict(re.fullmatch(r"(.+?) ([\d.e+-]+) s \(\d+ %\)", p).groups() for p in line[len("time: "):].split(", "))
    assert list(parts) == ["decode and resample", "front end", "encoder", "writing"]
    assert 0 < sum(float(v) for v in parts.values()) <= wall
