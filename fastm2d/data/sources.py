"""Where training items come from: the embedded synthetic set, a folder, or a CSV list; checked before training.

Audio files (WAV, FLAC, OGG, MP3 ...) are decoded and turned into log-mel by the reference front end;
`.npy` files are original-style precomputed log-mel, (1, 80, T) or (80, T) float32.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError  # noqa: F401  (re-exported)
from ..frontend import first_line, sound_info, wav_truncation
from .file_list import FileList

log = logging.getLogger("fastm2d.data")

# what libsndfile decodes: .oga is Ogg audio as desktop sound themes ship it, .opus Opus in Ogg (libsndfile >= 1.0.29)
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif"}
LMS_EXT = ".npy"
CSV_COLUMNS = ("file_name", "path", "filename", "file")


@dataclass
class BadFile:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def list_files(spec: str, root: Optional[str] = None) -> List[Path]:
    """A folder (searched recursively for audio and .npy files) or a CSV (column file_name/path, or one column)."""
    return [Path(n) for n in _list(spec, root)]


def list_file_names(spec: str, root: Optional[str] = None):
    """`list_files` as a FileList, built from strings without a Path per item (2 million CSV rows: seconds)."""
    return FileList(_list(spec, root))


def _list(spec: str, root: Optional[str]):
    p = Path(spec)
    if p.is_dir():
        # Everything named like audio or .npy, also dangling links and folders named so: the checks list them
        # as unusable with the reason instead of dropping them silently.
        files = sorted(f for f in walk(p) if f.suffix.lower() in AUDIO_EXTS | {LMS_EXT})
        if not files:
            raise DataError(f"{p}: no audio or .npy files found (looked for {sorted(AUDIO_EXTS | {LMS_EXT})})")
        return files
    if p.suffix.lower() == ".csv" and p.is_file():
        return _read_csv(p, Path(root) if root else p.parent)  # strings
    raise DataError(f"data.train={spec!r}: not 'synthetic', an existing folder, or an existing .csv file")


def walk(top: Path) -> Iterator[Path]:
    """Every entry below `top`, as Path.rglob('*') gives them (links to folders listed, not entered; unreadable
    folders passed over), with an explicit stack: rglob and os.walk recurse, and a tree 1,000 folders deep ended
    in RecursionError."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (PermissionError, FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            path = folder / entry.name
            yield path
            try:
                if entry.is_dir() and not entry.is_symlink():
                    stack.append(path)
            except OSError:
                continue


def list_digest(names: Sequence[str]) -> str:
    """sha1 of an ordered list of names (any a file system allows): what a store or statistics were built from.
    The names of a FileList (or a store) are hashed straight from its byte buffer, in one vectorised pass."""
    import hashlib
    files = getattr(names, "files", None)
    if isinstance(files, FileList):  # a NameView
        return files.digest()
    h = hashlib.sha1()
    for n in names:
        h.update(n.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def read_csv_rows(path: Path) -> List[List[str]]:
    """The non-blank rows of a CSV file (the header first). UTF-8, with or without a byte-order mark; a row with
    fewer fields than the header, or text that is not UTF-8, is a DataError naming the file and the line."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); save the list as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    if rows:
        width = len(rows[0][1])
        short = next(((n, r) for n, r in rows[1:] if len(r) < width), None)
        if short:
            raise DataError(f"{path}:{short[0]}: {len(short[1])} fields, the header has {width}")
    return [r for _, r in rows]


def find_column(rows: List[List[str]], names: Tuple[str, ...]) -> Optional[int]:
    """Index of the first header cell (case-insensitive) that is one of `names`, or None."""
    header = [c.strip().lower() for c in rows[0]] if rows else []
    return next((header.index(c) for c in names if c in header), None)


def file_value_rows(path: Path, key: str, columns: Tuple[str, ...], what: str,
                    root: Optional[Path] = None) -> Iterator[Tuple[int, str, Path, str]]:
    """A CSV of a file column and a value column (one of `columns`: labels, captions) -> (line, the file cell, the
    file resolved under `root` or the CSV's folder, the value cell) per row. A missing CSV names the setting `key`;
    a missing column names both kinds of column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}={path}: file not found")
    rows = read_csv_rows(path)
    fcol, vcol = find_column(rows, CSV_COLUMNS), find_column(rows, columns)
    if fcol is None or vcol is None:
        raise DataError(f"{path}: needs a file column ({'/'.join(CSV_COLUMNS)}) and a {what} column "
                        f"({'/'.join(columns)}); header is {rows[0] if rows else 'empty'}")
    base = Path(root) if root else path.parent
    for line, r in enumerate(rows[1:], start=2):
        p = Path(r[fcol].strip())
        yield line, r[fcol], (p if p.is_absolute() else base / p).resolve(), r[vcol] if vcol < len(r) else ""


def _read_csv(path: Path, root: Path) -> List[str]:
    rows = read_csv_rows(path)
    if not rows:
        raise DataError(f"{path}: empty CSV list")
    header = rows[0]
    column = find_column(rows, CSV_COLUMNS)
    if column is None:
        if len(header) != 1:
            raise DataError(f"{path}: no column named one of {CSV_COLUMNS} in header {rows[0]}")
        column, body = 0, rows  # a plain one-column list without header
    else:
        body = rows[1:]
    # Plain strings, no Path objects: 2 million rows cost seconds less (the caller keeps them in a FileList).
    base = str(root)
    return [n if os.path.isabs(n) else os.path.join(base, n) for n in (r[column].strip() for r in body)]


def sample_name(sample: dict) -> str:
    """What messages call a streamed (webdataset) sample: its shard's URL and its key."""
    return f"{sample.get('__url__', '')}#{sample.get('__key__', '?')}"


def probe_file(path: Path, n_mels: int = 80, min_seconds: float = 0.0, min_frames: int = 1) -> Optional[str]:
    """Cheap header check; returns the reason a file is unusable, or None.

    Audio must hold at least `min_seconds` (one patch width), a .npy log-mel at least `min_frames` frames.
    Content faults that only decoding shows (NaN samples, a truncated FLAC) are found when first read, then
    listed and left out for the rest of the run (see CropDataset).
    """
    if path.is_symlink() and not path.exists():
        return f"dangling symbolic link (to {path.readlink()})"
    if path.is_dir():
        return "a folder, not a file"
    if not path.is_file():
        return "file not found"
    if path.stat().st_size == 0:
        return "empty file"
    if path.suffix.lower() == LMS_EXT:
        return lms_array(path, n_mels, min_frames)[1]
    try:
        frames, samplerate = sound_info(path)
    except Exception as e:
        return f"cannot decode audio ({first_line(e)})"
    if frames <= 0:
        return "no samples"
    if frames < min_seconds * samplerate:
        return (f"too short: {frames / samplerate * 1000:.0f} ms of audio, at least "
                f"{min_seconds * 1000:.0f} ms (one patch width) needed")
    return wav_truncation(path)


def lms_array(path: Path, n_mels: int = 80, min_frames: int = 1) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """An original-style .npy log-mel, memory-mapped (a crop reads only its bytes), and why it is unusable (None
    when it is usable): the file checks and the loader open it the same way."""
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as e:
        return None, f"unreadable .npy ({e})"
    return arr, check_lms_array_shape(arr, n_mels, min_frames)


def check_lms_array_shape(arr: np.ndarray, n_mels: int = 80, min_frames: int = 1) -> Optional[str]:
    if arr.dtype.kind != "f":
        return f"dtype {arr.dtype} is not floating point"
    shape = arr.shape[1:] if arr.ndim == 3 and arr.shape[0] == 1 else arr.shape
    if len(shape) != 2 or shape[0] != n_mels or shape[1] < 1:
        return f"shape {arr.shape} is not (1, {n_mels}, T) or ({n_mels}, T)"
    if shape[1] < min_frames:
        return f"too short: {shape[1]} frames, at least {min_frames} (one patch width) needed"
    return None


def check_files(files: List[Path], n_mels: int = 80, min_seconds: float = 0.0,
                min_frames: int = 1) -> Tuple[List[Path], List[BadFile]]:
    """Probe every file before training -> (usable, unusable with reasons). `require_usable` decides."""
    good, bad = [], []
    for f in files:
        reason = probe_file(f, n_mels, min_seconds, min_frames)
        (bad.append(BadFile(f, reason)) if reason else good.append(f))
    return good, bad


def require_usable(good: List[Path], bad: List[BadFile], on_bad_file: str, label: str, listing: Path) -> None:
    """'error' (or nothing usable) stops with one line naming the first bad file and the full list's path;
    'skip' logs a warning and goes on without them."""
    if not bad:
        return
    total = len(good) + len(bad)
    if on_bad_file == "error" or not good:
        fix = "fix or remove them" + (", or set data.on_bad_file=skip" if good else "")
        raise DataError(f"{len(bad)} of {total} {label} files are unusable (first: {bad[0]}); all listed in "
                        f"{listing}; {fix}")
    shown = "\n  ".join(str(b) for b in bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
    log.warning("skipping %d of %d unusable %s files (listed in %s):\n  %s", len(bad), total, label, listing, shown)
