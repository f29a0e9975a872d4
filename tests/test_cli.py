"""The `fastm2d` command end to end: pretrain, resume, stats, embed, export, and its error messages."""
import json
import shutil
import subprocess

import numpy as np

from fastm2d.cli import main

from .conftest import TINY_TRAIN, write_tone


def test_pretrain_resume_embed_export(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=2"]
    assert main(args) == 0
    assert main(args[:-1] + ["train.max_steps=4", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    wavs = [str(write_tone(tmp_path / f"a{i}.wav", seconds=1.5)) for i in range(2)]
    assert main(["embed", "--weights", str(run), "--out", str(tmp_path / "feats"), *wavs]) == 0
    feats = np.load(tmp_path / "feats" / "a0.npy")
    assert feats.shape == (10, 5 * 64)  # 1.5 s = 151 frames -> chunks of 64: 4 + 4 + 2 patch columns
    assert main(["embed", "--level", "clip", "--weights", str(run), "--out", str(tmp_path / "clip"), wavs[0]]) == 0
    assert np.allclose(np.load(tmp_path / "clip" / "a0.npy"), feats.mean(0), atol=1e-5)
    assert main(["export", str(run), str(tmp_path / "exp")]) == 0
    assert "checkpoint-" in capsys.readouterr().out


def test_stats_command(tmp_path, capsys):
    for i in range(3):
        write_tone(tmp_path / f"t{i}.wav", seconds=1.0, freq=200 + 100 * i)
    assert main(["stats", str(tmp_path), "--items", "3", "--out", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    mean, std = result["norm_stats"]
    assert -20 < mean < 0 and std > 0 and result["items"] == 3


def test_user_errors_exit_2_with_the_key_or_file(tmp_path, capsys):
    assert main(["pretrain", f"out_dir={tmp_path}", "train.bogus=1"]) == 2
    assert "train.bogus" in capsys.readouterr().err
    assert main(["pretrain", f"out_dir={tmp_path}", f"data.train={tmp_path / 'none.csv'}"]) == 2
    assert "none.csv" in capsys.readouterr().err
    assert main(["embed", "--weights", str(tmp_path / "missing.pth"), "--out", str(tmp_path), "x.wav"]) == 2
    assert "missing.pth" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = shutil.which("fastm2d")
    assert exe, "the `fastm2d` console script is not on PATH: install with pip install -e ."
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout
