"""Command-line conventions: --version, defaults in every --help, --help without loading torch, `auto` devices,
`prepare --workers 0` in-process, results rows updated not duplicated, and a default run that says what it is."""
from __future__ import annotations

import json
import subprocess
import sys

from fastm2d.cli import build_parser, main
from fastm2d.errors import ConfigError

from .conftest import TINY_TRAIN, write_tone


def _commands():
    return build_parser()._subparsers._group_actions[0].choices


def test_version_and_help_answer_without_importing_torch():
    probe = ("import sys, contextlib, io\nfrom fastm2d.cli import main\n"
             "for argv in (['--version'], ['--help'], ['pretrain', '--help'], ['embed', '--help']):\n"
             "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
             "        assert main(argv) == 0, argv\n"
             "    assert out.getvalue().startswith(('fastm2d ', 'usage: fastm2d')), out.getvalue()\n"
             "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "False"  # torch was never imported


def test_every_option_with_a_default_shows_it_in_help():
    for name, parser in _commands().items():
        text = parser.format_help()
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False) and action.dest != "help":
                assert "(default:" in (action.help or "") or f"(default: {action.default}" in text, (name, action.dest)


def test_devices_default_to_auto():
    for name in ("embed", "linear-eval", "finetune"):
        assert _commands()[name].get_default("device") == "auto", name


def test_prepare_with_zero_workers_runs_in_this_process(tmp_path, monkeypatch):
    import multiprocessing

    from fastm2d.data import LogMelStore
    from fastm2d.data.prepare import prepare

    def no_pool(*a, **k):
        raise AssertionError("workers=0 started worker processes")
    monkeypatch.setattr(multiprocessing, "get_context", no_pool)
    for i in range(3):
        write_tone(tmp_path / "src" / f"t{i}.wav", seconds=1.0) if (tmp_path / "src").mkdir(exist_ok=True) or True \
            else None
    summary = prepare(str(tmp_path / "src"), tmp_path / "store", workers=0, files_per_shard=2, stats_items=2,
                      progress=False)
    assert summary["items"] == 3 and len(LogMelStore(tmp_path / "store")) == 3


def test_linear_eval_results_rows_are_updated_not_appended(tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=1"]) == 0
    out = tmp_path / "eval"
    for seeds in ("1", "2"):
        assert main(["linear-eval", str(run), "synthetic:20", "--out", str(out), "--seeds", seeds, "--quiet"]) == 0
    rows = (out / "results.md").read_text().splitlines()
    assert len(rows) == 2 and all(r.endswith("| 2 |") for r in rows), rows  # two tasks, each once, the latest run


def test_a_run_without_config_says_what_it_starts(tmp_path, capsys):
    assert main(["pretrain", f"out_dir={tmp_path / 'run'}", *TINY_TRAIN, "train.max_steps=1"]) == 0
    err = capsys.readouterr().err
    assert "no --config: starting the paper's recipe, a ViT-tiny M2D (64 wide, 2 blocks" in err


def test_one_spelling_for_weights_and_outputs_and_the_old_ones_warn(tmp_path, capsys, monkeypatch):
    """--weights and --out on every command; 0.1's positional forms (and adapt --from) still run, each with a
    warning that shows the new form, and give the same result."""
    import fastm2d.checkpoint as checkpoint
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), *TINY_TRAIN, "train.max_steps=1"]) == 0  # --out = out_dir=
    assert (run / "checkpoint-1.pth").is_file()
    capsys.readouterr()
    exported = []
    monkeypatch.setattr(checkpoint, "export_original", lambda w, o, **k: exported.append((str(w), str(o))) or "x")
    assert main(["export", "--weights", str(run), "--out", "a"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["export", str(run), "b"]) == 0
    assert "write `fastm2d export --weights CHECKPOINT --out OUT`" in capsys.readouterr().err
    assert exported == [(str(run), "a"), (str(run), "b")]
    # linear-eval: new and old spellings give the same numbers; the old one warns
    new, old = tmp_path / "new", tmp_path / "old"
    assert main(["linear-eval", "synthetic:20", "--weights", str(run), "--out", str(new), "--seeds", "1",
                 "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["linear-eval", str(run), "synthetic:20", "--out", str(old), "--seeds", "1", "--quiet"]) == 0
    assert "write `fastm2d linear-eval TASK --weights WEIGHTS`" in capsys.readouterr().err
    for name in ("synthetic-event.json", "synthetic-pitch.json"):
        a, b = (json.loads((d / name).read_text()) for d in (new, old))
        assert a["scores"] == b["scores"]
    # mixed or missing forms: one line, exit 2
    assert main(["linear-eval", str(run), "synthetic:20", "--weights", str(run)]) == 2
    assert "both given" in capsys.readouterr().err
    assert main(["linear-eval", "synthetic:20"]) == 2
    assert "--weights is required" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path)]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_adapt_from_is_the_old_spelling_of_weights(monkeypatch, capsys):
    import fastm2d.train.adapt as adapt
    seen = []

    def stop(audio, weights, *a):
        seen.append(weights)
        raise ConfigError("stopped here")
    monkeypatch.setattr(adapt, "adapt_config", stop)
    assert main(["adapt", "clips", "--weights", "w.pth"]) == 2
    assert "warning" not in capsys.readouterr().err
    assert main(["adapt", "clips", "--from", "w.pth"]) == 2
    assert "write `fastm2d adapt AUDIO --weights CHECKPOINT`" in capsys.readouterr().err
    assert seen == ["w.pth", "w.pth"]


def test_linear_eval_and_finetune_take_key_value_overrides(tmp_path, monkeypatch, capsys):
    import fastm2d.eval.finetune as ft
    import fastm2d.eval.linear as linear
    run = tmp_path / "run"
    assert main(["pretrain", f"out_dir={run}", *TINY_TRAIN, "train.max_steps=1"]) == 0
    probes = []
    real_probe = linear.train_linear_probe
    monkeypatch.setattr(linear, "train_linear_probe", lambda *a, **k: probes.append(k) or real_probe(*a, **k))
    assert main(["linear-eval", "synthetic:20", "--weights", str(run), "--seeds", "1", "--quiet", "--out",
                 str(tmp_path / "e"), "max_epochs=2", "patience=1", "lr=0.01", "batch_size=8"]) == 0
    assert probes and all((p["max_epochs"], p["patience"], p["lr"], p["batch_size"]) == (2, 1, 0.01, 8)
                          for p in probes)
    assert json.loads((tmp_path / "e" / "synthetic-event.json").read_text())["probe"]["max_epochs"] == 2
    configs = []
    monkeypatch.setattr(ft, "finetune", lambda w, task, out, cfg, **k: configs.append(cfg) or
                        {"metric": "accuracy", "valid": 0.0, "test": 0.0})
    assert main(["finetune", "synthetic:20", "--weights", str(run), "--epochs", "3", "--out", str(tmp_path / "f"),
                 "warmup_epochs=1", "weight_decay=0.01", "freq_mask=0", "time_mask=0", "rrc=false", "lr=0.02"]) == 0
    c = configs[0]
    assert (c.epochs, c.warmup_epochs, c.weight_decay, c.freq_mask, c.time_mask, c.rrc, c.lr) == \
        (3, 1, 0.01, 0, 0, False, 0.02)
    capsys.readouterr()
    assert main(["finetune", "synthetic:20", "--weights", str(run), "warmup=1"]) == 2
    assert "'warmup'" in capsys.readouterr().err  # an unknown key is named
    assert main(["finetune", "synthetic:20", "--weights", str(run), "rrc=maybe"]) == 2
