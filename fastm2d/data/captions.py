"""M2D-CLAP's captions: each training clip's captions as fixed sentence embeddings (the original encodes them
once, offline, with a frozen text encoder; so does fastm2d), one drawn per training crop.

  read_captions(csv)          file_name, caption rows (a clip may have several rows: several captions)
  embed_captions(texts, ...)  the text encoder's embedding of every caption, through a cache that keeps each
                              caption's vector under a hash of its text, per encoder: a second run, or a run on a
                              list that shares captions, encodes only what is new
  read_precomputed(npz, ...)  embeddings made elsewhere: <audio file stem> -> (D,) or (n, D) (no pickle)
  CaptionTargets              item -> one of its caption embeddings, chosen from the crop's seed (exact resume)
  NamedCaptions               the same for streamed shards: a sample -> its clip's embeddings, found by the file
                              name in its JSON member

Everything is checked at start-up: a training clip without a caption, an empty caption, embeddings of mixed
width or non-finite values are each one DataError naming the file.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..atomic import atomic_file
from ..user_cache import user_cache
from .sources import DataError, file_value_rows, sample_name

log = logging.getLogger("fastm2d.data")

CAPTION_COLUMNS = ("caption", "captions", "text", "description")
ENCODE_BATCH = 256


def default_cache_dir() -> Path:
    return user_cache("captions")


def read_captions(path: Path, root: Optional[Path] = None) -> Dict[Path, List[str]]:
    """CSV of a file column and a caption column -> {resolved audio path: [captions]} (rows of one file add up)."""
    out: Dict[Path, List[str]] = {}
    for line, cell, file, value in file_value_rows(path, "offline.captions", CAPTION_COLUMNS, "caption", root):
        if not value.strip():
            raise DataError(f"{path}:{line}: {cell}: empty caption")
        out.setdefault(file, []).append(value.strip())
    return out


def caption_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encoder_fingerprint(source: str, pooling: str) -> str:
    """Which encoder made a vector: its folder's files (names, sizes, modification times) and the pooling, or the
    model id where it is not a folder. A changed model file gives a new cache."""
    h = hashlib.sha256(f"{pooling}\0".encode())
    folder = Path(source)
    if folder.is_dir():
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    else:
        h.update(source.encode())
    return h.hexdigest()[:32]


def _read_cache(path: Path) -> Dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path) as z:  # arrays only: numpy refuses pickled objects by default
            keys, vectors = z["keys"], z["vectors"]
        if keys.ndim != 1 or vectors.ndim != 2 or len(keys) != len(vectors) or not np.isfinite(vectors).all():
            raise ValueError("inconsistent arrays")
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s: unreadable caption cache (%s): captions are encoded again", path, e)
        return {}
    return {str(k): v for k, v in zip(keys, vectors)}


def embed_captions(texts: Sequence[str], encode: Callable[[List[str]], np.ndarray], fingerprint: str,
                   cache_dir: Optional[Path] = None) -> np.ndarray:
    """(len(texts), D) float32: each distinct caption encoded once, by `encode` (a batch of strings -> (b, D)),
    or read from the cache that earlier runs with the same encoder left."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"{fingerprint}.npz"
    known = _read_cache(path)
    keys = [caption_key(t) for t in texts]
    todo = sorted({k: t for k, t in zip(keys, texts) if k not in known}.items())
    if todo:
        log.info("encoding %d captions (%d found in %s)", len(todo), len(set(keys)) - len(todo), path)
        for start in range(0, len(todo), ENCODE_BATCH):
            chunk = todo[start:start + ENCODE_BATCH]
            vectors = np.asarray(encode([t for _, t in chunk]), dtype=np.float32)
            if vectors.ndim != 2 or len(vectors) != len(chunk) or not np.isfinite(vectors).all():
                raise DataError(f"the text encoder gave {vectors.shape} for {len(chunk)} captions, or non-finite "
                                f"values")
            known.update({k: v for (k, _), v in zip(chunk, vectors)})
        try:
            with atomic_file(path) as f:
                np.savez(f, keys=np.array(sorted(known)), vectors=np.stack([known[k] for k in sorted(known)]))
        except OSError as e:  # a read-only or full cache costs only the encoding next time
            log.warning("%s: caption cache not written (%s)", path, e)
    widths = {known[k].shape[-1] for k in keys}
    if len(widths) > 1:
        raise DataError(f"{path}: cached caption embeddings of widths {sorted(widths)}; delete the file")
    return np.stack([known[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)


def read_precomputed(path: Path) -> Dict[str, np.ndarray]:
    """.npz of <audio file stem> -> (D,) or (n, D) caption embeddings (the original keeps a pickled dict in .npy;
    `np.savez(out, **dict)` turns a trusted one into this)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"offline.caption_embeddings={path}: file not found")
    try:
        with np.load(path) as z:
            out = {k: np.atleast_2d(np.asarray(z[k], dtype=np.float32)) for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz of caption embeddings ({e})") from None
    widths = {v.shape[-1] for v in out.values()}
    bad = next((k for k, v in out.items() if v.ndim != 2 or not np.isfinite(v).all()), None)
    if bad is not None or len(widths) > 1:
        raise DataError(f"{path}: {bad or 'entries'}: embeddings must be finite (D,) or (n, D) arrays of one width "
                        f"(widths {sorted(widths)})")
    return out


def stem_table(embeddings: Dict[str, np.ndarray], stems: Sequence[str]):
    """The embeddings of `stems` as one (U, D) table, and each stem's rows in it."""
    blocks = [embeddings[s] for s in stems]
    starts = np.concatenate([[0], np.cumsum([len(b) for b in blocks])]).astype(np.int64)
    rows = {s: np.arange(a, b) for s, a, b in zip(stems, starts[:-1], starts[1:])}
    return (np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)), rows


class CaptionTargets:
    """Item -> one caption embedding (D,), drawn per crop from the crop seed, so a resumed run draws the same
    captions. Stored as one (U, D) table and each item's rows in it (CSR), compact for millions of clips."""

    def __init__(self, per_item: Sequence[np.ndarray], table: np.ndarray):
        self.table = np.ascontiguousarray(table, dtype=np.float32)
        counts = np.array([len(r) for r in per_item], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.rows = np.concatenate(per_item).astype(np.int64) if len(per_item) else np.zeros(0, np.int64)
        self.dim = int(self.table.shape[1])

    @classmethod
    def from_texts(cls, files: Sequence[Path], captions: Dict[Path, List[str]], source: str,
                   embed: Callable[[List[str]], np.ndarray]) -> "CaptionTargets":
        """Training files (in item order), their captions, and a function that embeds a list of captions."""
        missing = [f for f in files if Path(f).resolve() not in captions]
        if missing:
            raise DataError(f"{source}: no caption for {len(missing)} of {len(files)} training files, e.g. "
                            f"{missing[0]}")
        texts = sorted({t for f in files for t in captions[Path(f).resolve()]})
        index = {t: i for i, t in enumerate(texts)}
        per_item = [np.array([index[t] for t in captions[Path(f).resolve()]]) for f in files]
        return cls(per_item, embed(texts))

    @classmethod
    def from_precomputed(cls, files: Sequence[Path], embeddings: Dict[str, np.ndarray],
                         source: str) -> "CaptionTargets":
        missing = [f for f in files if Path(f).stem not in embeddings]
        if missing:
            raise DataError(f"{source}: no embeddings for {len(missing)} of {len(files)} training files (keyed by "
                            f"file stem), e.g. {Path(missing[0]).stem!r} for {missing[0]}")
        table, rows = stem_table(embeddings, sorted({Path(f).stem for f in files}))
        return cls([rows[Path(f).stem] for f in files], table)

    def __call__(self, item: int, crop_start: int, seed: int = 0) -> np.ndarray:
        lo, hi = self.offsets[item], self.offsets[item + 1]
        pick = lo if hi - lo == 1 else lo + np.random.default_rng((seed, 0xCA9)).integers(hi - lo)
        return self.table[self.rows[pick]]


class NamedCaptions:
    """A streamed sample -> one caption embedding of its clip, found by the `name` in its JSON member (the file path
    `prepare --format shards` wrote): by that path in the captions CSV, else by its stem where the stem is unique
    (precomputed embeddings are keyed by stem). A sample with no caption raises DataError naming it (listed and
    skipped like an undecodable one)."""

    def __init__(self, targets: CaptionTargets, paths: Sequence[str], stems: Sequence[str], source: str):
        self.targets, self.dim, self.source = targets, targets.dim, source
        self.by_path = {p: i for i, p in enumerate(paths) if p}
        counts: Dict[str, int] = {}
        for s in stems:
            counts[s] = counts.get(s, 0) + 1
        self.by_stem = {s: i for i, s in enumerate(stems) if counts[s] == 1}

    @classmethod
    def from_texts(cls, captions: Dict[Path, List[str]], source: str,
                   embed: Callable[[List[str]], np.ndarray]) -> "NamedCaptions":
        files = sorted(captions)
        return cls(CaptionTargets.from_texts(files, captions, source, embed), [str(f) for f in files],
                   [f.stem for f in files], source)

    @classmethod
    def from_precomputed(cls, embeddings: Dict[str, np.ndarray], source: str) -> "NamedCaptions":
        stems = sorted(embeddings)
        table, rows = stem_table(embeddings, stems)
        return cls(CaptionTargets([rows[s] for s in stems], table), [], stems, source)

    def __call__(self, sample: dict, seed: int) -> np.ndarray:
        import json
        where = sample_name(sample)
        try:
            name = json.loads(sample["json"]).get("name") if "json" in sample else None
        except (ValueError, AttributeError):
            name = None
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: no file name in its JSON member to find its captions by")
        item = self.by_path.get(str(Path(name).resolve()), self.by_stem.get(Path(name).stem))
        if item is None:
            raise DataError(f"{where}: {name}: no caption in {self.source}")
        return self.targets(item, 0, seed)
