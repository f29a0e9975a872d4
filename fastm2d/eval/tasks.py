"""Evaluation tasks: a CSV (`file_name`, `label`, `split` in train/valid/test; several labels separated by commas
make it multi-label), a folder holding such a `meta.csv`, or the built-in `synthetic` tasks (1500 labelled sound
scenes generated on the fly, 60/20/20 % train/valid/test: event type, 5 classes, and frequency band, 3 classes),
which need no data; `synthetic:N` takes N clips."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..data.sources import CSV_COLUMNS, DataError, find_column, read_csv_rows
from ..data.synthetic import BAND_NAMES, EVENT_NAMES, synth_labels
from .scores import accuracy, mean_average_precision

SPLITS = ("train", "valid", "test")
# 1500 clips: 300 test clips; 600 (120 test) spread untrained initialisations over 12 points of accuracy
SYNTHETIC_CLIPS, SYNTHETIC_SECONDS, SYNTHETIC_SEED = 1500, 2.0, 20261126


@dataclass
class EvalTask:
    name: str
    items: List[str]  # file paths, or "synthetic:<index>"
    labels: np.ndarray  # (n, classes) multi-hot (one-hot for single-label)
    splits: np.ndarray  # (n,) of "train" / "valid" / "test"
    classes: List[str]
    multi_label: bool = False
    synthetic: Optional[dict] = field(default=None)  # {seed, seconds} for built-in tasks

    def index(self, split: str) -> np.ndarray:
        return np.nonzero(self.splits == split)[0]

    @property
    def metric(self) -> str:
        return "mAP" if self.multi_label else "accuracy"

    def score(self, scores: np.ndarray, idx: np.ndarray) -> float:
        """The task's metric of `scores` (n, classes) against the labels of items `idx`."""
        return mean_average_precision(scores, self.labels[idx]) if self.multi_label else \
            accuracy(scores, self.labels[idx])

    def key(self) -> str:
        """What the cached embeddings of this task depend on."""
        import hashlib
        h = hashlib.sha1("\n".join(self.items).encode())
        h.update(repr(self.synthetic).encode())
        if self.synthetic is None:  # the files as they are now: changed audio is embedded again, never stale
            for item in self.items:
                try:
                    st = os.stat(item)
                    h.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(b"missing\n")
        return h.hexdigest()[:12]  # the clips, not the labels: tasks over the same clips share embeddings


def _synthetic_tasks(n: int = SYNTHETIC_CLIPS) -> List[EvalTask]:
    kinds, bands = np.array([synth_labels(SYNTHETIC_SEED, i) for i in range(n)]).T  # audio is generated on use
    splits = np.array(["train"] * (n * 6 // 10) + ["valid"] * (n * 2 // 10) + ["test"] * (n - n * 8 // 10))
    items = [f"synthetic:{i}" for i in range(n)]
    meta = {"seed": SYNTHETIC_SEED, "seconds": SYNTHETIC_SECONDS}
    return [EvalTask("synthetic-event", items, np.eye(len(EVENT_NAMES), dtype=np.float32)[kinds], splits,
                     list(EVENT_NAMES), synthetic=meta),
            EvalTask("synthetic-pitch", items, np.eye(len(BAND_NAMES), dtype=np.float32)[bands], splits,
                     list(BAND_NAMES), synthetic=meta)]


def _read_csv_task(path: Path) -> EvalTask:
    rows = read_csv_rows(path)
    fcol, lcol, scol = (find_column(rows, names) for names in (CSV_COLUMNS, ("label",), ("split",)))
    if fcol is None or lcol is None or scol is None:
        raise DataError(f"{path}: an evaluation task needs columns file_name, label and split; header is "
                        f"{rows[0] if rows else 'empty'}")
    items, names, splits = [], [], []
    for line, r in enumerate(rows[1:], start=2):
        split = r[scol].strip().lower()
        if split not in SPLITS:
            raise DataError(f"{path}:{line}: split {r[scol]!r}: expected train, valid or test")
        labels = [s.strip() for s in r[lcol].split(",") if s.strip()]
        if not labels:
            raise DataError(f"{path}:{line}: {r[fcol]}: empty label")
        p = Path(r[fcol].strip())
        items.append(str(p if p.is_absolute() else path.parent / p))
        names.append(labels)
        splits.append(split)
    for s in SPLITS:
        if s not in splits:
            raise DataError(f"{path}: no {s!r} rows (the protocol trains on train, stops early on valid, reports test)")
    classes = sorted({c for n in names for c in n})
    labels = np.zeros((len(items), len(classes)), dtype=np.float32)
    for i, n in enumerate(names):
        labels[i, [classes.index(c) for c in n]] = 1.0
    multi = any(len(n) > 1 for n in names)
    return EvalTask(path.parent.name if path.name == "meta.csv" else path.stem, items, labels, np.array(splits),
                    classes, multi_label=multi)


def load_tasks(spec: str) -> List[EvalTask]:
    """'synthetic' (or 'synthetic:N' clips) -> the two built-in tasks; a CSV or a folder with meta.csv -> one task."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        count = spec.split(":", 1)[1] if ":" in spec else str(SYNTHETIC_CLIPS)
        if not count.strip().isdigit():
            raise DataError(f"evaluation task {spec!r}: expected 'synthetic' or 'synthetic:N' with N a number of clips")
        n = int(count)
        if n < 10:
            raise DataError(f"evaluation task {spec!r}: at least 10 clips (6 / 2 / 2 for train / valid / test)")
        return _synthetic_tasks(n)
    p = Path(spec)
    if p.is_dir():
        p = p / "meta.csv"
    if not p.is_file():
        raise DataError(f"evaluation task {spec!r}: not 'synthetic', a CSV, or a folder with meta.csv")
    return [_read_csv_task(p)]
