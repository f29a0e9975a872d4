"""Command-line conventions: --version, defaults in every --help, --help without loading torch, `auto` devices,
`prepare --workers 0` in-process, results rows updated not duplicated, and a default run that says what it is."""
from __future__ import annotations

import subprocess
import sys

from fastm2d.cli import build_parser, main

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
