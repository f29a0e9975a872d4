"""A training run's folder: every file a run keeps there, named in one place. Whatever reads or writes a run
folder (the trainer, its checkpointer, metrics, the lock, the data set-up, `report`, `load_model`) asks this
object for the path, so a name cannot drift between the writer and its readers.

    RunFolder("runs/demo").checkpoint(1200)   -> runs/demo/checkpoint-1200.pth
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)\.pth$")


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    # what the run's description and progress are kept in
    @property
    def config(self) -> Path:  # the resolved configuration, YAML
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:  # one JSON row per logging step (and per monitor)
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def report(self) -> Path:  # `fastm2d report`'s figures and summary
        return self.path / "report"

    @property
    def ranks(self) -> Path:  # each rank's host:pid while it trains, for naming a lost rank (train/faults.py)
        return self.path / ".ranks"

    @property
    def eval(self) -> Path:  # `linear-eval --out RUN/eval`: results `report` shows beside the run's own
        return self.path / "eval"

    @property
    def profile(self) -> Path:  # train.profile's traces, tables and memory snapshots (train/profiling.py)
        return self.path / "profile"

    @property
    def lock(self) -> Path:  # one process trains here at a time (folder_lock.py)
        return self.path / ".fastm2d.lock"

    # the data set-up's results, reused by --resume and restarts
    @property
    def norm_stats(self) -> Path:
        return self.path / "norm_stats.json"

    @property
    def noise_stats(self) -> Path:
        return self.path / "noise_stats.json"

    def bad_files(self, label: str = "training") -> Path:  # training / noise / valid: unusable files, with reasons
        return self.path / f"bad_{label}_files.txt"

    def file_checks(self, key: str) -> Path:  # the header checks of one ordered list
        return self.path / f"file_checks-{key}.npz"

    def dataset_stats(self, key: str) -> Path:  # a data set's normalisation statistics (data/stats.py stats_key)
        return self.path / f"norm_stats-{key}.json"

    # checkpoints
    def checkpoint(self, step: int) -> Path:
        return self.path / f"checkpoint-{step}.pth"

    def checkpoints(self) -> Dict[int, Path]:
        return {int(m.group(1)): p for p in self.path.glob("checkpoint-*.pth") if (m := CHECKPOINT_RE.search(p.name))}

    def latest_checkpoint(self) -> Optional[Path]:
        found = self.checkpoints()
        return found[max(found)] if found else None

    @property
    def deepspeed(self) -> Path:  # every rank's ZeRO optimiser partitions, one folder per step
        return self.path / "deepspeed"

    @staticmethod
    def deepspeed_tag(step: int) -> str:
        return f"step{step}"
