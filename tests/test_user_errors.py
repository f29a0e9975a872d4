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


def _yaml(text):
    def setup(tmp):
        (tmp / "c.yaml").write_text(text)
        return ["pretrain", "--config", str(tmp / "c.yaml"), f"out_dir={tmp / 'new'}", *TINY_TRAIN]
    return setup


def _csv(content: bytes):
    def setup(tmp):
        (tmp / "list.csv").write_bytes(content)
        _tones(tmp, 2)
        return _config(f"data.train={tmp / 'list.csv'}", "data.norm_stats=[-8,4]")(tmp)
    return setup


def _out_dir_is_a_file(tmp):
    (tmp / "afile").write_text("x")
    return ["pretrain", f"out_dir={tmp / 'afile'}", *TINY_TRAIN]


def _out_dir_under_a_file(tmp):
    (tmp / "afile").write_text("x")
    return ["pretrain", f"out_dir={tmp / 'afile' / 'run'}", *TINY_TRAIN]


def _resume_an_empty_folder(tmp):
    (tmp / "run").mkdir()
    return ["pretrain", f"out_dir={tmp / 'run'}", *TINY_TRAIN, "--resume"]


def _cmd_on_tones(*argv):
    return lambda tmp: [argv[0], str(_tones(tmp / "audio", 2)), *argv[1:]]


def _linear_eval_layers(tmp):
    return ["linear-eval", str(_run_folder(tmp)), "synthetic:20", "--layers", "x"]


def _finetune_zero_batch(tmp):
    return ["finetune", str(_run_folder(tmp)), "synthetic:20", "--batch-size", "0"]


def _torn_store_manifest(tmp):
    from fastm2d.data.prepare import prepare
    prepare(str(_tones(tmp / "audio", 2)), tmp / "store", workers=1, stats_items=2, progress=False)
    manifest = tmp / "store" / "manifest.json"
    manifest.write_text(manifest.read_text()[:30])
    return _config(f"data.train={tmp / 'store'}")(tmp)


def _ckpt_meta(command, **changes):
    def setup(tmp):
        run = _run_folder(tmp)
        obj = torch.load(run / "checkpoint-1.pth", weights_only=True)
        obj.update(changes)
        torch.save(obj, run / "checkpoint-1.pth")
        if command == "embed":
            return ["embed", "--weights", str(run), "--out", str(tmp / "feats"), str(write_tone(tmp / "a.wav"))]
        return ["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=2", "--resume"]
    return setup


CASES = [
    ("zero batch", _config("train.batch_size=0"), ["train.batch_size=0", ">= 1"]),
    ("negative batch", _config("train.batch_size=-4"), ["train.batch_size=-4"]),
    ("mask ratio 1", _config("model.mask_ratio=1.0"), ["model.mask_ratio=1.0", "between 0 and 1"]),
    ("mask ratio 0", _config("model.mask_ratio=0.0"), ["model.mask_ratio=0.0"]),
    ("patch does not divide", _config("model.patch_size=[15,16]"), ["model.patch_size", "does not divide"]),
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
    # YAML and overrides: read in one place (config.load_config)
    ("yaml syntax", _yaml("model: {size: tiny\n"), ["c.yaml", "not valid YAML"]),
    ("yaml top-level list", _yaml("- a\n- b\n"), ["c.yaml", "top level must be a mapping", "list"]),
    ("yaml duplicate key", _yaml("out_dir: a\nout_dir: b\n"), ["c.yaml", "duplicate key"]),
    ("yaml python tag", _yaml("out_dir: !!python/object/apply:os.system [echo]\n"), ["c.yaml", "python/object"]),
    ("unknown interpolation", _config("out_dir=${nope}"), ["out_dir", "nope"]),
    ("unclosed list", _config("model.input_size=[80,"), ["model.input_size=[80,", "not valid YAML"]),
    # values the schema checks
    ("zero heads", _config("model.num_heads=0"), ["model.num_heads=0", ">= 1"]),
    ("zero patch", _config("model.patch_size=[0,16]"), ["model.patch_size=[0, 16]", ">= 1"]),
    ("negative width", _config("model.embed_dim=-64"), ["model.embed_dim=-64"]),
    ("zero depth", _config("model.depth=0"), ["model.depth=0", ">= 1"]),
    ("one beta", _config("train.betas=[0.9]"), ["train.betas=[0.9]", "two values"]),
    ("unknown device", _config("train.device=foo"), ["train.device='foo'", "cuda:N"]),
    ("negative workers", _config("data.num_workers=-1"), ["data.num_workers=-1", ">= 0"]),
    ("ema above 1", _config("train.ema_start=2"), ["train.ema_start=2.0", "[0, 1]"]),
    ("negative epochs", _config("train.epochs=-5"), ["train.epochs=-5.0", "epochs > 0"]),
    ("out_dir is a file", _out_dir_is_a_file, ["afile is a file, not a folder"]),
    ("out_dir under a file", _out_dir_under_a_file, ["afile is a file, so no folder can be made under it"]),
    ("resume an empty folder", _resume_an_empty_folder, ["--resume", "holds no checkpoint", "leave out --resume"]),
    # CSV lists
    ("csv row shorter than header", _csv(b"file_name,label\nt0.wav,a\nt1.wav\n"), ["list.csv:3", "1 fields"]),
    ("csv not utf-8", _csv(b"file_name\n\xff\xfe.wav\n"), ["list.csv", "not UTF-8"]),
    # command options
    ("prepare workers -1", _cmd_on_tones("prepare", "out_store", "--workers", "-1"), ["--workers", "-1: must be >= 0"]),
    ("prepare 0 files per shard", _cmd_on_tones("prepare", "out_store", "--files-per-shard", "0"),
     ["--files-per-shard", ">= 1"]),
    ("stats items -3", _cmd_on_tones("stats", "--items", "-3"), ["--items", "-3: must be >= 1"]),
    ("linear-eval layers x", _linear_eval_layers, ["--layers", "comma-separated integers"]),
    ("finetune batch 0", _finetune_zero_batch, ["--batch-size", "0: must be >= 1"]),
    ("torn store manifest", _torn_store_manifest, ["manifest.json", "unreadable store manifest"]),
    ("checkpoint sample rate abc", _ckpt_meta("embed", sample_rate="abc"), ["checkpoint-1.pth", "sample_rate='abc'"]),
    ("checkpoint epoch -3", _ckpt_meta("pretrain", epoch=-3), ["checkpoint-1.pth", "epoch=-3"]),
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


@pytest.mark.parametrize("argv, says", [
    (["pretrain", "train.base_lr=inf", "train.max_steps=1"], "base_lr=inf"),
    (["linear-eval", "synthetic:20", "lr=nan"], "lr=nan: expected a finite number >= 0"),
    (["finetune", "synthetic:20", "time_mask=-3"], "time_mask=-3: expected a finite number >= 0"),
    (["finetune", "synthetic:20", "lr=-inf"], "lr=-inf"),
    (["embed", "--layers", "99"], "--layers 99: this model has 2 blocks"),
])
def test_values_nobody_checked_are_one_line_exit_2(tiny_run, tmp_path, capsys, argv, says):
    """Non-finite rates, negative mask widths and layers beyond the model's depth ended in tracebacks (an inf base_lr
    trained): now one line naming the value, exit 2, before anything runs."""
    from fastm2d.cli import main

    from .conftest import write_tone
    clip = write_tone(tmp_path / "a.wav")
    extra = {"pretrain": ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
                          f"out_dir={tmp_path / 'run'}"],
             "embed": ["--weights", str(tiny_run), "--out", str(tmp_path / "e"), str(clip)]}.get(argv[0], [
                 "--weights", str(tiny_run), "--out", str(tmp_path / "o")])
    code = main([*argv, *extra])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "e").exists()


# ------------------------------------------------------------- metadata beside the weights, checked once ----
def _with_metadata(src, dst, **fields):
    obj = torch.load(src, weights_only=False)
    obj.update(fields)
    torch.save(obj, dst)
    return dst


@pytest.mark.parametrize("fields, message", [
    ({"epoch": -3}, "epoch=-3: expected a non-negative integer"),
    ({"epoch": "300"}, "epoch='300': expected a non-negative integer"),
    ({"epoch": 2.5}, "epoch=2.5"),
    ({"classes": [1, 2]}, "classes must be a list of class names"),
    ({"classes": "dog,cat"}, "classes must be a list of class names"),
    ({"multi_label": "false"}, "multi_label='false': expected true or false"),
])
def test_checkpoint_metadata_of_the_wrong_type_is_one_line(tmp_path, capsys, tiny_run, fields, message):
    from fastm2d.checkpoint import latest_checkpoint
    bad = _with_metadata(latest_checkpoint(tiny_run), tmp_path / "bad.pth", **fields)
    assert main(["export", "--weights", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and "bad.pth" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").rglob("*.pth"))


def test_a_model_folder_with_json_nested_too_deeply_is_one_line(tmp_path, capsys, tiny_run):
    from fastm2d import save_pretrained
    folder = save_pretrained(tiny_run, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config)[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}")
    assert main(["embed", "--weights", str(folder), "--out", str(tmp_path / "f"), "x.wav"]) == 2
    err = capsys.readouterr().err
    assert "config.json: unreadable (JSON nested too deeply)" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["embed", "linear-eval", "prepare", "export", "stats", "tag", "linear-eval-under"])
def test_out_of_the_wrong_kind_is_one_line_before_anything_runs(tmp_path, capsys, command):
    """--out naming a file where a command fills a folder (or a path under a file), or a folder where it writes
    one file; and a task spelling with a bad number."""
    afile, adir = tmp_path / "afile", tmp_path / "adir"
    afile.write_text("mine\n")
    adir.mkdir()
    clip = write_tone(tmp_path / "a.wav", seconds=1.0)
    args = {"embed": ["embed", "--weights", "W", "--out", str(afile), str(clip)],
            "linear-eval": ["linear-eval", "synthetic", "--weights", "W", "--out", str(afile)],
            "linear-eval-under": ["linear-eval", "synthetic", "--weights", "W", "--out", str(afile / "x")],
            "prepare": ["prepare", str(tmp_path), "--out", str(afile)],
            "export": ["export", "--weights", "W", "--out", str(afile)],
            "stats": ["stats", str(tmp_path), "--out", str(adir)],
            "tag": ["tag", str(clip), "--weights", "W", "--out", str(adir)]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--out" in err and ("is a file" in err or "a folder, but" in err) and "Traceback" not in err
    assert afile.read_text() == "mine\n" and not any(adir.iterdir())


def test_a_synthetic_task_with_a_bad_number_is_one_line(tmp_path, capsys, tiny_run):
    assert main(["linear-eval", "synthetic:abc", "--weights", str(tiny_run), "--out", str(tmp_path / "o")]) == 2
    assert "'synthetic:N' with N a number of clips" in capsys.readouterr().err
