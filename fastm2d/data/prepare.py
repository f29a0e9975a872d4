"""`fastm2d prepare SRC OUT`: audio (or original .npy log-mel) files -> a LogMelStore of memory-mapped shards.

Shards are fixed slices of the sorted file list, written by worker processes. A shard is finished when its
`shard-NNNNN.json` exists and its .bin has the size that json records; a re-run skips finished shards and
redoes any half-written one (its .tmp is discarded), so an interrupted job resumes. A file that cannot be
read becomes a line in failures.tsv with the reason; it never stops the job.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..atomic import atomic_file, remove_stale_temporaries, write_atomic
from ..folder_lock import RunLock
from ..frontend import N_MELS, LogMelSpectrogram, pad_samples
from .logmel_items import frontend_record, in_processes, item_lms
from .norm_stats_file import write_norm_stats
from .sources import DataError, list_digest, list_files
from .stats import compute_norm_stats
from .store import FORMAT, INDEX_COLUMNS, VERSION, LogMelStore, read_manifest

log = logging.getLogger("fastm2d.prepare")


def _write_shard(task: Tuple[int, List[str], str, str, int, int, int]) -> dict:
    k, files, out, dtype, sample_rate, crop_frames, min_patch_frames = task
    torch.set_num_threads(1)  # one process per core; threads inside would oversubscribe
    out = Path(out)
    frontend = LogMelSpectrogram(sample_rate)
    pad_to = pad_samples(sample_rate, crop_frames)
    name = f"shard-{k:05d}"
    items, failures, offset = [], [], 0
    with atomic_file(out / f"{name}.bin") as f:
        for file in files:
            try:
                lms, audio_frames = item_lms(Path(file), frontend, pad_to, min_patch_frames)
            except Exception as e:  # every failure is recorded with its reason, never fatal
                failures.append([file, str(e).replace(str(file) + ": ", "")])
                continue
            f.write(np.ascontiguousarray(lms.T, dtype=dtype).tobytes())
            items.append([file, offset, lms.shape[1], audio_frames])
            offset += lms.shape[1]
    record = {"shard": k, "file": f"{name}.bin", "bytes": (out / f"{name}.bin").stat().st_size, "items": items,
              "failures": failures}
    write_atomic(out / f"{name}.json", json.dumps(record))  # the completion marker is written last
    return record


def _flat(d: dict, prefix: str = "") -> dict:
    """{'frontend': {'sample_rate': 16000}} -> {'frontend.sample_rate': 16000}: differences named key by key."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _finished(out: Path, k: int) -> Optional[dict]:
    marker, data = out / f"shard-{k:05d}.json", out / f"shard-{k:05d}.bin"
    if not (marker.is_file() and data.is_file()):
        return None
    record = json.loads(marker.read_text())
    return record if data.stat().st_size == record["bytes"] else None


def prepare(src: str, out: str | Path, workers: Optional[int] = None, files_per_shard: int = 1000,
            dtype: str = "float16", sample_rate: int = 16000, stats_items: int = 10000, crop_frames: int = 608,
            root: Optional[str] = None, seed: int = 0, progress: bool = True, min_patch_frames: int = 16) -> dict:
    """Prepare (or complete) a store; returns a summary with counts and timing. One `prepare` per store at a
    time: a second one into the same folder is refused; a killed one's temporary files are removed before a
    re-run completes the store."""
    with RunLock(Path(out)):
        remove_stale_temporaries(out)
        return _prepare(src, out, workers, files_per_shard, dtype, sample_rate, stats_items, crop_frames, root, seed,
                        progress, min_patch_frames)


def _prepare(src, out, workers, files_per_shard, dtype, sample_rate, stats_items, crop_frames, root, seed, progress,
             min_patch_frames) -> dict:
    """The store's build (see `prepare`).

    `crop_frames` is the longest crop the store serves: short clips are stored padded by frontend.py's rule for
    it (608 frames: 6.1 s, as the original's preparation) and every item's own audio length is recorded, so a
    shorter crop reads only the part its own rule pads to (LogMelStore(crop_frames=...)). Files with less
    audio than `min_patch_frames` frames (one patch width: 160 ms for 16x16 patches) are failures with that
    reason, not padding."""
    from tqdm import tqdm

    if dtype not in ("float16", "float32"):
        raise DataError(f"dtype={dtype!r}: expected float16 or float32")
    params = frontend_record(sample_rate)
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(f) for f in list_files(src, root)]
    chunks = [files[i:i + files_per_shard] for i in range(0, len(files), files_per_shard)]
    manifest_path = out / "manifest.json"
    # What the store is built from: re-running into the folder resumes only the same build, never mixes two.
    manifest = {"format": FORMAT, "version": VERSION, "complete": False, "dtype": dtype, "n_mels": N_MELS,
                "frontend": params, "sources": len(files), "sources_sha1": list_digest(files),
                "files_per_shard": files_per_shard, "max_crop_frames": crop_frames,
                "min_patch_frames": min_patch_frames}
    if manifest_path.is_file():
        old = read_manifest(manifest_path)
        flat_old, flat_new = _flat(old), _flat(manifest)
        changed = [f"{k}: {flat_old.get(k)!r} there, {v!r} now" for k, v in flat_new.items()
                   if k != "complete" and flat_old.get(k) != v]
        if changed:
            raise DataError(f"{out}: holds a store built from other inputs or settings ({'; '.join(changed)}); "
                            f"prepare into a new folder")
    write_atomic(manifest_path, json.dumps(manifest, indent=1))

    records = {k: r for k in range(len(chunks)) if (r := _finished(out, k))}
    todo = [(k, chunks[k], str(out), dtype, sample_rate, crop_frames, min_patch_frames) for k in range(len(chunks))
            if k not in records]
    skipped = len(records)
    workers = (os.cpu_count() or 1) if workers is None else workers  # 0: in this process, as data.num_workers=0
    bar = tqdm(total=len(files), initial=sum(len(chunks[k]) for k in records), desc="prepare", unit="file",
               disable=not progress)
    for record in in_processes(_write_shard, todo, workers):
        records[record["shard"]] = record
        bar.update(len(record["items"]) + len(record["failures"]))
    bar.close()

    order = sorted(records)
    index = ["\t".join(INDEX_COLUMNS) + "\n"]
    for k in order:  # names JSON-quoted: a tab or newline in a file name stays inside its field
        index += [f"{json.dumps(n)}\t{k}\t{o}\t{t}\t{a}\n" for n, o, t, a in records[k]["items"]]
    write_atomic(out / "index.tsv", "".join(index))
    failures = [fl for k in order for fl in records[k]["failures"]]
    write_atomic(out / "failures.tsv", "path\treason\n"  # JSON-quoted like index.tsv's names
                 + "".join(f"{json.dumps(p)}\t{json.dumps(r)}\n" for p, r in failures))
    n_items = sum(len(records[k]["items"]) for k in order)
    manifest.update(complete=True, items=n_items, failures=len(failures),
                    shards=[{"file": records[k]["file"], "bytes": records[k]["bytes"]} for k in order])
    write_atomic(manifest_path, json.dumps(manifest, indent=1))

    if n_items:
        store = LogMelStore(out, crop_frames=crop_frames)
        stats = compute_norm_stats(store, crop_frames, stats_items, seed, progress=progress)
        write_norm_stats(out / "stats.json", stats, items=min(stats_items, n_items), crop_frames=crop_frames)
    seconds = time.perf_counter() - t0
    processed = sum(len(t[1]) for t in todo)
    summary = {"items": n_items, "failures": len(failures), "shards": len(order), "shards_skipped": skipped,
               "files_processed": processed, "seconds": round(seconds, 2),
               "files_per_s": round(processed / max(seconds, 1e-9), 1), "workers": workers}
    if failures:
        log.warning("%d of %d files could not be prepared; see %s", len(failures), len(files), out / "failures.tsv")
    return summary
