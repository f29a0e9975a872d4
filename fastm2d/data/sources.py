"""Where training items come from: the embedded synthetic set, a folder, or a CSV list; checked before training.

Audio files (WAV, FLAC, OGG, MP3 ...) are decoded and turned into log-mel by the reference front end;
`.npy` files are original-style precomputed log-mel, (1, 80, T) or (80, T) float32.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

log = logging.getLogger("fastm2d.data")

AUDIO_EXTS = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}
LMS_EXT = ".npy"
CSV_COLUMNS = ("file_name", "path", "filename", "file")


class DataError(RuntimeError):
    """Training data is missing or unusable; the message names the file(s)."""


@dataclass
class BadFile:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def list_files(spec: str, root: Optional[str] = None) -> List[Path]:
    """A folder (searched recursively for audio and .npy files) or a CSV (column file_name/path, or one column)."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_EXTS | {LMS_EXT} and f.is_file())
        if not files:
            raise DataError(f"{p}: no audio or .npy files found (looked for {sorted(AUDIO_EXTS | {LMS_EXT})})")
        return files
    if p.suffix.lower() == ".csv" and p.is_file():
        return _read_csv(p, Path(root) if root else p.parent)
    raise DataError(f"data.train={spec!r}: not 'synthetic', an existing folder, or an existing .csv file")


def _read_csv(path: Path, root: Path) -> List[Path]:
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: empty CSV list")
    header = [c.strip().lower() for c in rows[0]]
    column = next((header.index(c) for c in CSV_COLUMNS if c in header), None)
    if column is None:
        if len(header) != 1:
            raise DataError(f"{path}: no column named one of {CSV_COLUMNS} in header {rows[0]}")
        column, body = 0, rows  # a plain one-column list without header
    else:
        body = rows[1:]
    files = [Path(r[column].strip()) for r in body]
    return [f if f.is_absolute() else root / f for f in files]


def probe_file(path: Path, n_mels: int = 80) -> Optional[str]:
    """Cheap header check; returns the reason a file is unusable, or None."""
    if not path.is_file():
        return "file not found"
    if path.stat().st_size == 0:
        return "empty file"
    if path.suffix.lower() == LMS_EXT:
        try:
            arr = np.load(path, mmap_mode="r")
        except Exception as e:
            return f"unreadable .npy ({e})"
        return check_lms_array_shape(arr, n_mels)
    try:
        import soundfile as sf
        info = sf.info(str(path))
    except Exception as e:
        return f"cannot decode audio ({str(e).splitlines()[0]})"
    if info.frames <= 0:
        return "no samples"
    return None


def check_lms_array_shape(arr: np.ndarray, n_mels: int = 80) -> Optional[str]:
    if arr.dtype.kind != "f":
        return f"dtype {arr.dtype} is not floating point"
    shape = arr.shape[1:] if arr.ndim == 3 and arr.shape[0] == 1 else arr.shape
    if len(shape) != 2 or shape[0] != n_mels or shape[1] < 1:
        return f"shape {arr.shape} is not (1, {n_mels}, T) or ({n_mels}, T)"
    return None


def check_files(files: List[Path], on_bad_file: str = "skip", n_mels: int = 80) -> Tuple[List[Path], List[BadFile]]:
    """Probe every file before training: 'error' raises one DataError listing them all, 'skip' drops them."""
    good, bad = [], []
    for f in files:
        reason = probe_file(f, n_mels)
        (bad.append(BadFile(f, reason)) if reason else good.append(f))
    if bad:
        listing = "\n  ".join(str(b) for b in bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
        if on_bad_file == "error" or not good:
            raise DataError(f"{len(bad)} of {len(files)} training files are unusable:\n  {listing}")
        log.warning("skipping %d of %d unusable training files:\n  %s", len(bad), len(files), listing)
    return good, bad
