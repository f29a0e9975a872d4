"""Every path a user reaches with their own input: one line naming the key or file and the fix, exit status 2,
no traceback, and existing run folders and checkpoints left exactly as they were."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastm2d.cli import main

from .conftest import TINY_TRAIN, write_tone


def _snapshot(folder: Path):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")} \
        if folder.is_dir() else None


def _tones(folder: Path, n: int):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_tone(folder / f"t{i}.wav", seconds=0.5, freq=200 + 20 * i)
    return folder


def _run_folder(tmp_path, steps=1) -> Path:
    """A finished tiny run: what --resume finds."""
    run = tmp_path / "run"
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, f"train.max_steps={steps}"]) == 0
    return run


# Each case: (name, setup(tmp_path) -> argv, words the one-line message must contain)
def _config(*overrides):
    return lambda tmp: ["pretrain", f"out_dir={tmp / 'new'}", *TINY_TRAIN, *overrides]


def _data_empty_folder(tmp):
    (tmp / "empty").mkdir()
    return _config(f"data.train={tmp / 'empty'}")(tmp)


def _data_csv_without_column(tmp):
    (tmp / "list.csv").write_text("name,label\na.wav,dog\n")
    return _config(f"data.train={tmp / 'list.csv'}")(tmp)


def _data_npy_wrong_shape(tmp):
    (tmp / "d").mkdir()
    np.save(tmp / "d" / "x.npy", np.zeros((3, 64, 10), dtype=np.float32))
    return _config(f"data.train={tmp / 'd'}")(tmp)


def _data_store_other_version(tmp):
    store = tmp / "store"
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"format": "fastm2d-logmel-shards", "version": 99}))
    return _config(f"data.train={store}")(tmp)


def _data_too_few_for_a_batch(tmp):
    return _config(f"data.train={_tones(tmp / 'small', 5)}", "train.batch_size=8", "data.norm_stats=[-8,4]")(tmp)


def _ckpt_truncated(tmp):
    run = _run_folder(tmp)
    ckpt = run / "checkpoint-1.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    return ["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=2", "--resume"]


def _ckpt_other_model_size(tmp):
    run = _run_folder(tmp)
    return ["pretrain", f"out_dir={run}", *TINY_TRAIN, "model.depth=3", "train.max_steps=2", "--resume"]


def _ckpt_encoder_only(tmp):
    run = _run_folder(tmp)
    obj = torch.load(run / "checkpoint-1.pth", weights_only=True)
    enc = {k: v for k, v in obj["model"].items() if not k.startswith(("decoder", "target", "mask"))}
    (run / "checkpoint-1.pth").unlink()
    torch.save({"model": enc}, run / "checkpoint-1.pth")
    return ["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=2", "--resume"]


def _ckpt_existing_run_without_resume(tmp):
    run = _run_folder(tmp)
    return ["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=2"]


def _weights_truncated_for_embed(tmp):
    run = _run_folder(tmp)
    ckpt = run / "checkpoint-1.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    return ["embed", "--weights", str(ckpt), "--out", str(tmp / "feats"), str(write_tone(tmp / "a.wav"))]


CASES = [
    ("zero batch", _config("train.batch_size=0"), ["train.batch_size=0", ">= 1"]),
    ("negative batch", _config("train.batch_size=-4"), ["train.batch_size=-4"]),
    ("mask ratio 1", _config("model.mask_ratio=1.0"), ["model.mask_ratio=1.0", "between 0 and 1"]),
    ("mask ratio 0", _config("model.mask_ratio=0.0"), ["model.mask_ratio=0.0"]),
    ("patch does not divide", _config("model.patch_size=[16,15]"), ["model.patch_size", "multiple"]),
    ("eta 1", _config("data.noise.train=synthetic", "data.noise.eta=1.0"), ["data.noise.eta=1.0", "[0, 1)"]),
    ("eta negative", _config("data.noise.train=synthetic", "data.noise.eta=-0.1"), ["data.noise.eta=-0.1"]),
    ("sample rate", _config("data.sample_rate=44100"), ["data.sample_rate=44100", "16000 or 32000"]),
    ("mistyped key", _config("train.bacth_size=4"), ["train.bacth_size"]),
    ("wrong type", _config("train.batch_size=many"), ["train.batch_size"]),
    ("empty folder", _data_empty_folder, ["empty", "no audio or .npy files"]),
    ("csv without column", _data_csv_without_column, ["list.csv", "no column named"]),
    ("npy wrong shape", _data_npy_wrong_shape, ["x.npy", "shape (3, 64, 10)"]),
    ("store of another version", _data_store_other_version, ["manifest.json", "v99"]),
    ("too few items", _data_too_few_for_a_batch, ["5 usable training items", "train.batch_size",
                                                  "data.min_epoch_items"]),
    ("truncated checkpoint", _ckpt_truncated, ["checkpoint-1.pth", "unreadable"]),
    ("other model size", _ckpt_other_model_size, ["checkpoint-1.pth", "depth"]),
    ("encoder-only to --resume", _ckpt_encoder_only, ["checkpoint-1.pth", "not a fastm2d training checkpoint"]),
    ("existing run without --resume", _ckpt_existing_run_without_resume, ["already holds checkpoints", "--resume"]),
    ("truncated weights to embed", _weights_truncated_for_embed, ["checkpoint-1.pth", "unreadable"]),
]


@pytest.mark.parametrize("name, setup, words", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_exit_2_and_touches_nothing(name, setup, words, tmp_path, capsys):
    argv = setup(tmp_path)
    capsys.readouterr()
    before = _snapshot(tmp_path / "run")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"fastm2d {argv[0]}: error: ")]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert _snapshot(tmp_path / "run") == before  # checkpoints, metrics and config of a run: untouched


def test_no_traceback_reaches_the_terminal(tmp_path):
    """The same through the installed console script, in a fresh process."""
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastm2d.cli", "pretrain", f"out_dir={tmp_path}", "model.mask_ratio=2"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "model.mask_ratio=2" in r.stderr
