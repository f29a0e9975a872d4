"""`fastm2d embed`: a whole corpus (files, folders, CSV lists) -> one array per clip under --out, resumable.

Clips are decoded in DataLoader workers; clips of the same length are encoded together in batches (clips of
different lengths never share a batch: padding would change their features), their chunks batched together
(Runtime.encode_lms). Recordings longer than a window (97 s for 80x608) are read, encoded and written window by window
(long_audio.py, `npy_rows`): memory bounded by a window whatever their length, features the whole file's. Outputs mirror the inputs' relative paths (a folder's tree, a CSV's
paths under its root; single files by name), each written atomically, and `manifest.jsonl` records every clip:
input file, array, shape, frame times. A re-run skips what the manifest holds (a killed run resumes).
"""
from __future__ import annotations

from ..atomic import atomic_file, open_append, remove_stale_temporaries, write_atomic
from ..folder_lock import RunLock
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .batching import length_batches
from .long_audio import encode_file, is_long, recording_seconds
from ..data.sources import AUDIO_EXTS, list_files
from ..errors import AudioReadError, DataError

MANIFEST = "manifest.jsonl"
LEVELS = ("frame", "clip", "scene", "timestamp")  # scene = clip (HEAR's word)


@dataclass
class Item:
    path: Path
    name: str  # output path under --out, without the .npy


MAX_NAME_BYTES = 200  # an output name's last component: the file system's limit is 255 bytes, ".timestamps.npy" adds 15


def expand_inputs(inputs: Sequence[str], level: str, taken: Optional[Dict[str, str]] = None) -> List[Item]:
    """Files, folders (every audio file below, by relative path) and CSV lists (paths under the CSV's folder).
    A file given twice is embedded once. `taken`: output names already on disk (the manifest) -> their input; an
    input keeps its recorded name, and a new input never takes a name another input holds."""
    items: List[Item] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():  # the training lists' own walk, its audio files only
            found = [f for f in list_files(str(p)) if f.suffix.lower() in AUDIO_EXTS and f.is_file()]
            if not found:
                raise DataError(f"{p}: no audio files found (looked for {sorted(AUDIO_EXTS)})")
            items += [Item(f, f.relative_to(p).with_suffix("").as_posix()) for f in found]
        elif p.suffix.lower() == ".csv" and p.is_file():
            for f in list_files(str(p)):
                try:
                    name = f.resolve().relative_to(p.parent.resolve()).with_suffix("").as_posix()
                except ValueError:  # outside the CSV's folder
                    name = f.stem
                items.append(Item(f, name))
        else:
            items.append(Item(p, p.stem))
    return _unique_names(_first_of_each(items), level, taken or {})


def _first_of_each(items: List[Item]) -> List[Item]:
    seen, out = set(), []
    for it in items:
        if str(it.path) not in seen:
            seen.add(str(it.path))
            out.append(it)
    return out


def _unique_names(items: List[Item], level: str, taken: Dict[str, str]) -> List[Item]:
    """Two inputs with one output name (`a` in two folders, or `a` beside `a.timestamps`, or a name an earlier run
    gave another input): both kept, the later one as `a_`, then `a_2`, `a_3` ... (a counter per name: linear
    work however many collide); a name component too long for the file system is cut and given a digest."""
    import hashlib
    recorded = {file: name for name, file in taken.items()}
    owner: Dict[str, str] = dict(taken)  # output name -> input
    outputs = lambda n: [n] + ([n + ".timestamps"] if level == "timestamp" else [])  # noqa: E731
    counters: Dict[str, int] = {}
    for it in items:
        if str(it.path) in recorded:  # embedded by an earlier run: keep its name (a re-run skips it)
            it.name = recorded[str(it.path)]
            continue
        head, _, last = it.name.rpartition("/")
        if len(os.fsencode(last)) > MAX_NAME_BYTES:  # bytes as the file system counts them (any name it holds)
            digest = hashlib.sha1(os.fsencode(str(it.path))).hexdigest()[:12]
            last = os.fsencode(last)[:MAX_NAME_BYTES - 13].decode("utf-8", "ignore") + "-" + digest
            it.name = f"{head}/{last}" if head else last
        base, name = it.name, it.name
        while any(owner.get(o, str(it.path)) != str(it.path) for o in outputs(name)):
            k = counters[base] = counters.get(base, 0) + 1
            name = base + ("_" if k == 1 else f"_{k}")
        it.name = name
        for o in outputs(name):
            owner[o] = str(it.path)
    return items


def _done(out: Path) -> Dict[str, dict]:
    """The manifest's finished clips (a torn last line from a kill is ignored)."""
    done = {}
    path = out / MANIFEST
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                if (out / row["array"]).is_file():
                    done[row["file"]] = row  # a file embedded again: its last row
            except (ValueError, KeyError, TypeError):
                continue
        # torn, stale and replaced lines gone before anything is appended
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in done.values()))
    return done


def _source(path: Path) -> dict:
    """What says an input is the one an array was made from: its size and modification time."""
    try:
        st = path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {}


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as f:  # a kill leaves at most a hidden .<name>.*.tmp, never a torn array
        np.save(f, array)


NPY_HEADER_BYTES = 128  # a .npy (format 1.0) header with room for any 2-D float32 shape, written last


@contextlib.contextmanager
def npy_rows(path: Path, width: int):
    """`with npy_rows(p, D) as append: append(rows)...`: a (rows, D) float32 .npy written as the rows come (its
    header, which holds the row count, last), atomically: a kill leaves no torn array."""
    count = 0
    with atomic_file(path) as f:
        f.write(bytes(NPY_HEADER_BYTES))

        def append(rows: np.ndarray) -> None:
            nonlocal count
            f.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
            count += len(rows)
        yield append
        header = repr({"descr": "<f4", "fortran_order": False, "shape": (count, width)})
        f.seek(0)
        f.write(b"\x93NUMPY\x01\x00" + (NPY_HEADER_BYTES - 10).to_bytes(2, "little")
                + header.ljust(NPY_HEADER_BYTES - 11).encode("latin1") + b"\n")


def _embed_long(runtime, path: Path, array: Path, level: str, layers, progress: bool):
    """One recording longer than a window, read and encoded window by window (long_audio.encode_file): frames
    written as they come, a clip embedding summed as they come. -> (shape, seconds, frame times in ms)."""
    width = runtime.feature_dim * (len(layers) if layers is not None else 1)
    total, n, times = np.zeros(width, np.float64), 0, []
    seconds = recording_seconds(path)
    bar = tqdm(total=round(seconds), desc=path.name[:40], unit="s", disable=not progress, leave=False)
    with contextlib.ExitStack() as stack:
        append = stack.enter_context(npy_rows(array, width)) if level not in ("clip", "scene") else None
        for window in encode_file(runtime, path, layers):
            frames = torch.cat(window.layers, dim=-1).cpu().numpy()
            if append is not None:
                append(frames)
            total += frames.sum(0, dtype=np.float64)
            n += len(frames)
            times.append(window.times_ms.numpy())
            bar.update(min(round(window.lms_frames * runtime.frontend.hop_length / runtime.sample_rate) - bar.n,
                           bar.total - bar.n))
        if append is None:
            _save(array, (total / n).astype(np.float32))
    bar.close()
    return ((width,) if append is None else (n, width)), window.samples / runtime.sample_rate, np.concatenate(times)


def embed_corpus(runtime, inputs: Sequence[str], out: str | Path, level: str = "frame",
                 layers: Optional[List[int]] = None, batch_size: int = 16, workers: int = 2,
                 progress: bool = True) -> dict:
    """`_embed_corpus` with `out` held by this process: two `embed` runs into one folder would lose manifest
    rows; the second is refused. A killed run's temporary files are removed before this one resumes it."""
    if level not in LEVELS:
        raise DataError(f"--level {level!r}: expected one of {LEVELS}")
    runtime.check_layers(layers)
    with RunLock(Path(out)):
        remove_stale_temporaries(out, recursive=True)  # arrays mirror the inputs' folders
        return _embed_corpus(runtime, inputs, out, level, layers, batch_size, workers, progress)


def _embed_corpus(runtime, inputs, out, level, layers, batch_size, workers, progress) -> dict:
    """-> {'written', 'skipped' (already done), 'failed', 'clips_per_s'}; every failure is printed with its reason."""
    import sys
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    taken = {}
    for file, row in done.items():  # names the earlier runs gave (timestamps included)
        taken[row["array"][:-len(".npy")]] = file
        if row.get("timestamps"):
            taken[row["timestamps"][:-len(".npy")]] = file
    items = expand_inputs(inputs, level, taken)
    # An array is reused only when everything that made it is the same: the weights, the level, the layers and
    # the input file itself (once keyed by the input's path alone: other weights gave "already there" and old arrays).
    made_with = {"weights": getattr(runtime, "weights_id", None), "level": level, "layers": layers}
    if getattr(runtime, "int8", False):  # other features: never reused as fp32 ones, nor the reverse
        made_with["int8"] = True
    sources = [_source(it.path) for it in items]
    todo = [i for i, it in enumerate(items) if str(it.path) not in done
            or done[str(it.path)].get("made_with") != made_with or done[str(it.path)].get("source") != sources[i]]
    replaced = sum(1 for i in todo if str(items[i].path) in done)
    if replaced:
        print(f"replacing {replaced} array(s) in {out} made with other weights or settings, or from an input "
              f"changed since", file=sys.stderr)
    stats = {"written": 0, "skipped": len(items) - len(todo), "failed": 0, "replaced": replaced}
    manifest = open_append(out / MANIFEST)
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="embed", unit="clip", disable=not progress, dynamic_ncols=True)

    def failed(i: int, error: str) -> None:
        print(f"skipped: {error}", file=sys.stderr)
        stats["failed"] += 1
        bar.update(1)

    # Where the time goes (printed by `embed`): waiting for the loader (decoding and resampling in its workers),
    # the front end, the encoder (its device work ends at the copy back), writing arrays and manifest rows.
    spent = stats["seconds"] = dict.fromkeys(("decode and resample", "front end", "encoder", "writing"), 0.0)
    def record(i: int, shape, seconds: float, times: np.ndarray) -> None:
        """The clip's manifest row, after its arrays: one whole line, flushed."""
        it = items[i]
        row = {"file": str(it.path), "array": f"{it.name}.npy", "shape": list(shape), "level": level,
               "seconds": seconds, "made_with": made_with, "source": sources[i]}
        if level == "timestamp":
            _save(out / f"{it.name}.timestamps.npy", times)
            row["timestamps"] = f"{it.name}.timestamps.npy"
        if len(shape) == 2:
            row["frame_ms"] = [float(times[0]), float(times[1] - times[0]) if len(times) > 1 else 0.0]
        manifest.write(json.dumps(row) + "\n")
        manifest.flush()
        stats["written"] += 1

    long = [i for i in todo if is_long(runtime, items[i].path)]  # read in windows: memory bounded by a window
    try:
        for i in long:
            t = time.perf_counter()
            try:
                shape, seconds, times = _embed_long(runtime, items[i].path, out / f"{items[i].name}.npy", level,
                                                    layers, progress)
            except AudioReadError as e:
                failed(i, str(e))
                continue
            spent["encoder"] += time.perf_counter() - t  # decoding, front end and encoder interleaved, window by window
            record(i, shape, seconds, times)
            bar.update(1)
        long_set = set(long)
        batches = iter(length_batches([it.path for it in items], runtime.sample_rate, batch_size, workers, failed,
                                      order=[i for i in todo if i not in long_set]))
        while True:
            t = time.perf_counter()
            try:
                group, wav = next(batches)
            except StopIteration:
                break
            t1 = time.perf_counter()
            spent["decode and resample"] += t1 - t
            with runtime.inference():
                lms = runtime.to_lms(wav.to(runtime.device), runtime.sample_rate)
                t2 = time.perf_counter()
                feats = runtime.encode_lms(lms, return_layers=layers is not None)
            if layers is not None:
                feats = torch.cat([feats[k] for k in layers], dim=-1)
            feats = feats.float().cpu().numpy()
            t3 = time.perf_counter()
            spent["front end"] += t2 - t1
            spent["encoder"] += t3 - t2
            times = runtime.frame_times_ms(lms.shape[-1]).numpy()
            for i, f in zip(group, feats):
                array = f.mean(0) if level in ("clip", "scene") else f
                _save(out / f"{items[i].name}.npy", array)
                record(i, array.shape, wav.shape[-1] / runtime.sample_rate, times)
            spent["writing"] += time.perf_counter() - t3
            bar.update(len(group))
            bar.set_postfix(clips_s=f"{stats['written'] / max(time.perf_counter() - t0, 1e-9):.1f}")
    finally:
        bar.close()
        manifest.close()
        if replaced:
            _done(out)  # one row per input again: the replaced arrays' old rows go
    stats["clips_per_s"] = stats["written"] / max(time.perf_counter() - t0, 1e-9)
    return stats
