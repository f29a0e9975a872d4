"""One spelling on every command: `--weights` for the model read, `--out` for what is written, `key=value` for
settings. The spellings of 0.1 (positional weights and outputs, `adapt --from`) still work until 0.3, each with
a one-line warning that shows the new form.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from .errors import ConfigError
from .config import check_out_dir

REMOVED_IN = "0.3"
KEY_VALUE = re.compile(r"^[A-Za-z_][\w.]*=")  # a settings override, never a task name or a path


def warn_old_spelling(old: str, new: str) -> None:
    print(f"fastm2d: warning: `{old}` is the old spelling (accepted until {REMOVED_IN}); write `{new}`",
          file=sys.stderr, flush=True)


def settle(args) -> None:
    """Bring a parsed command line to the one spelling (in place); mixed or incomplete forms are ConfigErrors."""
    command = args.command
    if command in ("linear-eval", "finetune"):
        given = [args.task, *args.positional]
        args.overrides = [a for a in given if KEY_VALUE.match(a)] + list(args.overrides)
        names = [a for a in given if not KEY_VALUE.match(a)]
        if len(names) == 2:  # 0.1: WEIGHTS TASK
            _old_positional(args, "weights", names.pop(0), f"fastm2d {command} WEIGHTS TASK",
                            f"fastm2d {command} TASK --weights WEIGHTS")
        if len(names) != 1:
            raise ConfigError(f"expected one TASK (a CSV, a folder with meta.csv, or 'synthetic') and --weights W, "
                              f"got {names}")
        args.task = names[0]
    elif command == "export":
        if args.positional:  # 0.1: CHECKPOINT OUT
            if len(args.positional) != 2:
                raise ConfigError(f"expected --weights W --out DIR, got {args.positional}")
            _old_positional(args, "weights", args.positional[0], "fastm2d export CHECKPOINT OUT",
                            "fastm2d export --weights CHECKPOINT --out OUT")
            _old_positional(args, "out", args.positional[1], None, None)
    elif command == "prepare" and args.positional_out is not None:  # 0.1: SRC OUT
        _old_positional(args, "out", args.positional_out, "fastm2d prepare SRC OUT", "fastm2d prepare SRC --out OUT")
    elif command == "adapt" and args.from_ is not None:  # 0.1: --from CHECKPOINT
        _old_positional(args, "weights", args.from_, "fastm2d adapt AUDIO --from CHECKPOINT",
                        "fastm2d adapt AUDIO --weights CHECKPOINT")
    elif command == "pretrain" and args.out is not None:
        args.overrides = [*args.overrides, f"out_dir={args.out}"]
    for name in ("weights", "out"):
        if getattr(args, f"{name}_required", False) and getattr(args, name, None) is None:
            raise ConfigError(f"--{name} is required")
    if getattr(args, "out", None) is not None and command in OUT_KIND:
        check_out_kind(command, Path(args.out), OUT_KIND[command])


# What each command's --out names: a folder it fills, or one file it writes.
OUT_KIND = {"embed": "folder", "linear-eval": "folder", "finetune": "folder", "prepare": "folder", "export": "folder",
            "adapt": "folder", "stats": "file", "tag": "file"}


def check_out_kind(command: str, out: Path, kind: str) -> None:
    """--out a file where a folder is needed (or under a file), or a folder where a file is written: one line
    before anything runs."""
    if kind == "file" and out.is_dir():
        raise ConfigError(f"--out {out}: a folder, but `{command}` writes one file there; name a file")
    check_out_dir(out if kind == "folder" else out.parent, "--out")


def _old_positional(args, name: str, value: str, old, new) -> None:
    if getattr(args, name, None) is not None:
        raise ConfigError(f"--{name} {getattr(args, name)} and the old positional {value!r} both given: keep --{name}")
    setattr(args, name, value)
    if old is not None:
        warn_old_spelling(old, new)
