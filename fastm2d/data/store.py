"""LogMelStore: the reader of `fastm2d prepare` output, memory-mapped log-mel shards.

Layout of a store folder:
  manifest.json      format, dtype, mel bins, front-end parameters, every shard's byte size, counts
  index.tsv          name, shard, offset (frames), frames (stored), audio_frames (the clip's own): one row per item
  shard-00000.bin    items back to back, each a time-major (T, 80) array in the manifest's dtype
  stats.json         [mean, std] of log-mel over random crops (as the original computes them)
  failures.tsv       path and reason for every input that could not be prepared

Short clips are stored padded by frontend.py's rule for the longest crop the store serves (`max_crop_frames`
in the manifest; 608 frames = 6.1 s by default, as the original); opened for a shorter crop, a store hands out
only the frames that crop's own rule pads to (crop + 3), so a 2 s crop of a 1 s clip still holds the whole clip.

Time-major rows make a crop of frames [s, s + n) one contiguous byte range, so a random crop reads only its
own bytes through the memory map.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..frontend import padded_frames
from ..atomic import atomic_file
from .file_list import FileList
from .norm_stats_file import read_norm_stats  # the one schema of statistics files
from .sources import DataError

log = logging.getLogger("fastm2d.data")

FORMAT = "fastm2d-logmel-shards"
VERSION = 2  # 2: audio_frames per item (version 1 padded every short clip to 6.1 s whatever the crop)
INDEX_COLUMNS = ("name", "shard", "offset", "frames", "audio_frames")


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable store manifest ({str(e).splitlines()[0][:80]}); torn by an interrupted "
                        f"write? re-run `fastm2d prepare` into a new folder") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not a store manifest (a JSON object expected)")
    return manifest


def is_store(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def item_span(frames, audio_frames, crop_frames: Optional[int], repeat_short: bool):
    """Frames of a stored item (padded by frontend.py's rule for the longest crop) handed out for a crop of
    `crop_frames`: what the rule pads the clip to for that crop, or (repeat_short) its own audio only, which the crop
    tiles; everything stored when no crop is given. Arrays or single items."""
    if repeat_short:
        return np.minimum(frames, audio_frames)
    if crop_frames is None:
        return frames
    return np.minimum(frames, np.maximum(audio_frames, padded_frames(crop_frames)))


def warn_if_prepared_shorter(where, manifest: dict, crop_frames: Optional[int], repeat_short: bool) -> None:
    """Log-mel prepared for shorter crops than this run's (its `max_crop_frames`) still serves them: short clips are
    then padded with the log-mel of silence beyond what was stored, which a warning says."""
    max_crop = int(manifest.get("max_crop_frames", crop_frames or 0))
    if crop_frames is not None and not repeat_short and crop_frames > max_crop:
        log.warning("%s was prepared for crops of up to %d frames; crops of %d frames pad its short clips with the "
                    "log-mel of silence", where, max_crop, crop_frames)


class LogMelStore:
    """len(store), store.names, store[i] -> float32 (F, T); store.load(i) -> a (F, T) memory-mapped view.

    crop_frames: the training crop; items are then cut to what frontend.py's rule pads a clip to for that crop
    (None: everything stored). repeat_short: items are cut to their own audio (the crop tiles them instead).
    """

    def __init__(self, root: str | Path, crop_frames: Optional[int] = None, repeat_short: bool = False):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"{self.root}: not a prepared log-mel store (no manifest.json); run `fastm2d prepare`")
        self.manifest = read_manifest(manifest_path)
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise DataError(f"{manifest_path}: store format {self.manifest.get('format')!r} "
                            f"v{self.manifest.get('version')}, this fastm2d reads {FORMAT!r} v{VERSION}: "
                            f"re-run `fastm2d prepare` into a new folder")
        if not self.manifest.get("complete", False):
            raise DataError(f"{self.root}: preparation did not finish; re-run `fastm2d prepare` to complete it")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.n_mels = int(self.manifest["n_mels"])
        self.sample_rate = int(self.manifest["frontend"]["sample_rate"])
        self.shard_files = [s["file"] for s in self.manifest["shards"]]
        self._check_shards()
        self._names, columns = self._read_index()
        self.shard, self.offset, self.frames, self.audio_frames = (np.ascontiguousarray(c) for c in columns.T)
        self._check_rows()
        self.crop_frames, self.repeat_short = crop_frames, repeat_short
        warn_if_prepared_shorter(self.root, self.manifest, crop_frames, repeat_short)
        self.span = item_span(self.frames, self.audio_frames, crop_frames, repeat_short)  # frames handed out
        self._maps: Dict[int, np.memmap] = {}

    def _check_shards(self) -> None:
        """A store whose shards were moved or truncated after preparation fails here, not mid-training."""
        for s in self.manifest["shards"]:
            path = self.root / s["file"]
            if not path.is_file():
                raise DataError(f"{path}: shard missing (moved or deleted after preparation?)")
            size = path.stat().st_size
            if size != s["bytes"]:
                raise DataError(f"{path}: {size} bytes, the manifest says {s['bytes']} (truncated or replaced?)")

    def _check_rows(self) -> None:
        """Every index row inside its shard: a valid shard number, a non-negative offset, at least one frame, its own
        audio no longer than what is stored, and offset + frames within the shard's bytes. Checked for all rows at
        once (vectorised: a 2-million-row index in milliseconds); a row pointing elsewhere would read another
        item's frames, or the end of a shard, silently."""
        n_shards = len(self.shard_files)
        per_frame = self.n_mels * self.dtype.itemsize
        shard_frames = np.array([s["bytes"] // per_frame for s in self.manifest["shards"]], dtype=np.int64)
        valid_shard = (self.shard >= 0) & (self.shard < n_shards)
        end = self.offset + self.frames
        limit = np.where(valid_shard, shard_frames[np.clip(self.shard, 0, max(n_shards - 1, 0))], -1) \
            if n_shards else np.full(len(self.shard), -1)
        bad = ~valid_shard | (self.offset < 0) | (self.frames < 1) | (self.audio_frames < 1) | \
            (self.audio_frames > self.frames) | (end > limit)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{self.root / 'index.tsv'}: {int(bad.sum())} rows point outside their shards, e.g. row "
                            f"{i + 2} ({self._names.name(i)}: shard {self.shard[i]}, offset {self.offset[i]}, frames "
                            f"{self.frames[i]}, audio {self.audio_frames[i]}); the store is damaged: re-run "
                            f"`fastm2d prepare` into a new folder")

    def _read_index(self) -> Tuple[FileList, np.ndarray]:
        """index.tsv -> (names, (N, 4) int64 columns). The parsed index is kept beside it in index.npz, keyed by
        the TSV's size and time: a 2-million-row store opens in a fraction of a second after its first opening
        (or right away: `prepare` writes it), where parsing the TSV takes seconds."""
        path = self.root / "index.tsv"
        if not path.is_file():
            raise DataError(f"{path}: index missing")
        st = path.stat()
        stamp = np.array([st.st_size, st.st_mtime_ns], dtype=np.int64)
        try:
            with np.load(self.root / INDEX_CACHE) as z:  # numpy refuses pickled objects by default
                if np.array_equal(z["tsv"], stamp) and len(z["columns"]) == self.manifest["items"]:
                    return FileList.from_arrays(z["buffer"], z["offsets"]), z["columns"]
        except (OSError, ValueError, KeyError):
            pass
        names, columns = parse_index(path)
        if len(names) != self.manifest["items"]:
            raise DataError(f"{path}: {len(names)} rows, the manifest says {self.manifest['items']} items")
        write_index_cache(self.root, names, columns, stamp)
        return names, columns

    # Memory maps are per process: not pickled to DataLoader workers, reopened there on first use.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def _map(self, shard: int) -> np.memmap:
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.root / self.shard_files[shard], dtype=self.dtype, mode="r")
        return self._maps[shard]

    def __len__(self) -> int:
        return len(self._names)

    @property
    def names(self) -> Sequence[str]:
        return self._names.names()

    @property
    def norm_stats(self) -> Optional[List[float]]:
        """The statistics `prepare` computed, when they were computed over crops like this store's (else None)."""
        path = self.root / "stats.json"
        if not path.is_file():
            return None
        stats, saved = read_norm_stats(path)
        if self.crop_frames is not None and (saved.get("crop_frames") != self.crop_frames
                                             or saved.get("repeat_short", False) != self.repeat_short):
            return None
        return stats

    def load(self, i: int) -> np.ndarray:
        """(F, T) view of item i (T = its span for the crop): nothing is read until it is sliced and copied."""
        start, frames = int(self.offset[i]) * self.n_mels, int(self.span[i])
        flat = self._map(int(self.shard[i]))[start:start + frames * self.n_mels]
        return flat.reshape(frames, self.n_mels).T

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for a store of {len(self)} items")
        return np.ascontiguousarray(self.load(i % len(self)), dtype=np.float32)


INDEX_CACHE = "index.npz"


def parse_index(path: Path) -> Tuple[FileList, np.ndarray]:
    names, rows = [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != list(INDEX_COLUMNS):
            raise DataError(f"{path}: unexpected header {header}")
        for line_no, line in enumerate(f, 2):
            r = line.rstrip("\n").split("\t")
            try:  # names are JSON strings: any name a file system allows, tabs and newlines included
                name = r[0]
                names.append(name[1:-1] if "\\" not in name and name[:1] == name[-1:] == '"' and len(name) > 1
                             else json.loads(name))
                rows.append((int(r[1]), int(r[2]), int(r[3]), int(r[4])))
            except (ValueError, IndexError):
                raise DataError(f"{path}:{line_no}: unreadable row; re-run `fastm2d prepare`") from None
    return FileList(names), np.array(rows, dtype=np.int64).reshape(-1, 4)


def write_index_cache(root: Path, names: FileList, columns: np.ndarray, stamp: np.ndarray) -> None:
    """Best effort (a read-only store is still read, only more slowly): atomic, so readers never see half."""
    try:
        with atomic_file(Path(root) / INDEX_CACHE) as f:
            np.savez(f, buffer=names.buffer, offsets=names.offsets, columns=columns, tsv=stamp)
    except OSError:
        pass  # best effort: the index is parsed again next time
