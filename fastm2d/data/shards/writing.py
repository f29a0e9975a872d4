"""Writing shards: `fastm2d prepare SRC --out OUT --format shards | logmel-shards` (write_shards)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ...atomic import atomic_file, write_atomic
from ...folder_lock import RunLock
from ...frontend import N_MELS, LogMelSpectrogram, pad_samples
from ..file_checks import check_files_once
from ..logmel_items import frontend_record, in_processes, item_lms
from ..offline_targets import read_label_rows
from ..sources import DataError, list_file_names
from .fetching import MANIFEST, webdataset_module


def write_shards(src: str, out: str | Path, files_per_shard: int = 1000, root: Optional[str] = None,
                 progress: bool = True, min_seconds: float = 0.16, labels: Optional[str] = None,
                 logmel: Optional[dict] = None, workers: Optional[int] = None) -> dict:
    """`fastm2d prepare SRC --out OUT --format shards`: each checked file's original bytes into shard-NNNNNN.tar
    (key = its index, member <key>.<its suffix>, and <key>.json naming the source file and, from a `labels` CSV,
    its labels), every shard written atomically; unusable files in failures.tsv with the reason (the store's
    listing); shards.json last. A file with no row in `labels` is refused before anything is written.

    `logmel` ({sample_rate, crop_frames, dtype, min_patch_frames}: `--format logmel-shards`): each sample is instead
    the log-mel a prepared store holds for the file (`<key>.npy`, (F, T), short clips padded by frontend.py's rule
    for the longest crop, its own audio frames in the JSON), made by `workers` processes: no decoding while
    training, and smaller than 16-bit audio at 16 kHz."""
    TarWriter = webdataset_module().TarWriter
    out = Path(out)
    with RunLock(out):
        files, bad = check_files_once(list_file_names(src, root), min_seconds=min_seconds, progress=progress)
        names = [str(f) for f in files]
        label_rows = read_label_rows(Path(labels), Path(root) if root else None) if labels else {}
        unlabelled = [n for n in names if labels and Path(n).resolve() not in label_rows]
        if unlabelled:
            raise DataError(f"--labels {labels}: no row for {len(unlabelled)} of the files, e.g. {unlabelled[0]}")
        failures = [(str(b.path), b.reason) for b in bad]
        shards: List[Dict] = []
        chunks = [(s, lo, names[lo:lo + files_per_shard]) for s, lo in enumerate(range(0, len(names), files_per_shard))]
        for s, lo, members in _shard_members(chunks, logmel, workers):
            name = f"shard-{s:06d}.tar"
            kept = 0
            with atomic_file(out / name) as f:
                with TarWriter(f) as w:
                    for i, path, content, extra in members:
                        if isinstance(content, str):  # the reason it could not be prepared
                            failures.append((path, content))
                            continue
                        meta = {"name": path, **extra,
                                **({"labels": label_rows[Path(path).resolve()]} if labels else {})}
                        w.write({"__key__": f"{i:09d}", **content, "json": json.dumps(meta).encode()})
                        kept += 1
            shards.append({"file": name, "samples": kept})
        write_atomic(out / "failures.tsv", "path\treason\n" + "".join(
            f"{json.dumps(p)}\t{json.dumps(r)}\n" for p, r in failures))
        samples = sum(x["samples"] for x in shards)
        about = {"format": "fastm2d-logmel-shards", **_logmel_about(logmel)} if logmel else \
            {"format": "fastm2d-audio-shards"}
        write_atomic(out / MANIFEST, json.dumps({**about, "shards": shards, "samples": samples,
                                                 "failures": len(failures)}, indent=1))
    return {"shards": len(shards), "samples": samples, "failures": len(failures)}


def _logmel_about(logmel: dict) -> dict:
    return {"dtype": logmel["dtype"], "max_crop_frames": logmel["crop_frames"], "n_mels": N_MELS,
            "frontend": frontend_record(logmel["sample_rate"])}


def _shard_members(chunks, logmel: Optional[dict], workers: Optional[int]):
    """(shard number, first index, [(index, path, {member: bytes} or the reason it failed, JSON extras)]) per shard,
    in order: the files' bytes, or (logmel) their log-mel made by a pool of processes."""
    if not logmel:
        for s, lo, paths in chunks:
            yield s, lo, [(i, p, {Path(p).suffix.lower().lstrip("."): Path(p).read_bytes()}, {})
                          for i, p in enumerate(paths, start=lo)]
        return
    frontend_record(logmel["sample_rate"])  # an unknown rate: one line before any file is read
    tasks = [(s, lo, paths, logmel) for s, lo, paths in chunks]
    workers = (os.cpu_count() or 1) if workers is None else workers
    # in order: shard s is written while the pool makes s+1 ...; a single shard is made here
    yield from in_processes(_logmel_members, tasks, workers if len(tasks) > 1 else 0, ordered=True)


def _logmel_members(task):
    """One shard's files -> their log-mel as .npy bytes (the store's per-item rule, logmel_items.item_lms)."""
    s, lo, paths, logmel = task
    torch.set_num_threads(1)
    frontend = LogMelSpectrogram(logmel["sample_rate"])
    pad_to = pad_samples(logmel["sample_rate"], logmel["crop_frames"])
    members = []
    for i, path in enumerate(paths, start=lo):
        try:
            lms, audio_frames = item_lms(Path(path), frontend, pad_to, logmel["min_patch_frames"])
        except Exception as e:  # noqa: BLE001 - every failure is listed with its reason, never fatal
            members.append((i, path, str(e).replace(f"{path}: ", ""), {}))
            continue
        buf = io.BytesIO()
        np.save(buf, lms.astype(logmel["dtype"]), allow_pickle=False)
        members.append((i, path, {"npy": buf.getvalue()}, {"audio_frames": int(audio_frames)}))
    return s, lo, members
