"""LogMelStore: the reader of `fastm2d prepare` output, memory-mapped log-mel shards.

Layout of a store folder:
  manifest.json      format, dtype, mel bins, front-end parameters, every shard's byte size, counts
  index.tsv          name, shard, offset (frames), frames: one row per item
  shard-00000.bin    items back to back, each a time-major (T, 80) array in the manifest's dtype
  stats.json         [mean, std] of log-mel over random crops (as the original computes them)
  failures.tsv       path and reason for every input that could not be prepared

Time-major rows make a crop of frames [s, s + n) one contiguous byte range, so a random crop reads only its
own bytes through the memory map.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .sources import DataError

FORMAT = "fastm2d-logmel-shards"
VERSION = 1


def is_store(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


class LogMelStore:
    """len(store), store.names, store[i] -> float32 (F, T); store.load(i) -> a (F, T) memory-mapped view."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"{self.root}: not a prepared log-mel store (no manifest.json); run `fastm2d prepare`")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise DataError(f"{manifest_path}: unknown store format {self.manifest.get('format')!r} "
                            f"v{self.manifest.get('version')}")
        if not self.manifest.get("complete", False):
            raise DataError(f"{self.root}: preparation did not finish; re-run `fastm2d prepare` to complete it")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.n_mels = int(self.manifest["n_mels"])
        self.sample_rate = int(self.manifest["frontend"]["sample_rate"])
        self.shard_files = [s["file"] for s in self.manifest["shards"]]
        self._check_shards()
        self._names, rows = self._read_index()
        self.shard, self.offset, self.frames = (np.asarray(c, dtype=np.int64) for c in zip(*rows)) if rows else \
            (np.zeros(0, np.int64),) * 3
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

    def _read_index(self) -> Tuple[List[str], List[Tuple[int, int, int]]]:
        path = self.root / "index.tsv"
        if not path.is_file():
            raise DataError(f"{path}: index missing")
        names, rows = [], []
        with open(path, newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None)
            if header != ["name", "shard", "offset", "frames"]:
                raise DataError(f"{path}: unexpected header {header}")
            for r in reader:
                names.append(r[0])
                rows.append((int(r[1]), int(r[2]), int(r[3])))
        if len(names) != self.manifest["items"]:
            raise DataError(f"{path}: {len(names)} rows, the manifest says {self.manifest['items']} items")
        return names, rows

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
    def names(self) -> List[str]:
        return self._names

    @property
    def norm_stats(self) -> Optional[List[float]]:
        path = self.root / "stats.json"
        return json.loads(path.read_text())["norm_stats"] if path.is_file() else None

    def load(self, i: int) -> np.ndarray:
        """(F, T) view of item i: nothing is read until it is sliced and copied."""
        start = int(self.offset[i]) * self.n_mels
        flat = self._map(int(self.shard[i]))[start:start + int(self.frames[i]) * self.n_mels]
        return flat.reshape(int(self.frames[i]), self.n_mels).T

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for a store of {len(self)} items")
        return np.ascontiguousarray(self.load(i % len(self)), dtype=np.float32)
