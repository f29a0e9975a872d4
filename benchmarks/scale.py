"""AudioSet-scale start-up and memory, measured on lists of real files (hard links to a few real recordings make a
200k- or 1M-item corpus cheap: each link is a file of its own to stat and to read a header from).

    python benchmarks/scale.py startup --items 200000 --out DIR     # file checks: old sequential, first, resume
    python benchmarks/scale.py memory --items 1000000 --workers 2 --out DIR   # USS of the loader, list vs FileList
    python benchmarks/scale.py index --rows 2000000 --out DIR      # opening a prepared store's index
    python benchmarks/scale.py throughput --out DIR                # crops/s per worker: store, WAV, FLAC, DALI

Each prints one markdown row per measurement; figures for this machine go to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def real_recordings(n: int = 8):
    """A few real WAVs from the Debian sound packages (benchmarks/real_sounds.py fetch), else generated tones."""
    import soundfile as sf
    from real_sounds import sound_files

    def long_enough(f):
        try:
            return sf.info(str(f)).duration >= 1.0
        except Exception:  # a few package files are mislabelled: left out
            return False
    found = [f for f in sorted(sound_files("lmms-common")) if f.suffix in (".wav", ".flac", ".ogg") and long_enough(f)][:n]
    return found, "real LMMS recordings" if found else "generated tones (run benchmarks/real_sounds.py fetch)"


def corpus(out: Path, items: int) -> Path:
    """out/corpus.csv listing `items` hard links (a few real files, linked over and over)."""
    out.mkdir(parents=True, exist_ok=True)
    csv, links = out / "corpus.csv", out / "links"
    if csv.is_file() and sum(1 for _ in open(csv)) == items + 1:
        return csv
    sources, _ = real_recordings()
    if not sources:
        import numpy as np
        import soundfile as sf
        tone = out / "tone.wav"
        sf.write(str(tone), (0.3 * np.sin(np.arange(16000 * 2) / 16000 * 2 * np.pi * 440)).astype("float32"), 16000)
        sources = [tone]
    with open(csv, "w") as f:
        f.write("file_name\n")
        for i in range(items):
            d = links / f"{i // 10000:03d}"
            if i % 10000 == 0:
                d.mkdir(parents=True, exist_ok=True)
            source = sources[i % len(sources)]
            p = d / f"{i:07d}{source.suffix}"
            if not p.exists():
                os.link(source, p)
            f.write(f"{p}\n")
    return csv


def _row(what, items, seconds, note=""):
    print(f"| {what} | {items:,} | {seconds:.2f} s | {seconds / items * 1e6:.1f} us | {note} |", flush=True)


def startup(args) -> None:
    from fastm2d.data.file_checks import check_files_once, default_workers
    from fastm2d.data.sources import check_files, list_file_names
    csv = corpus(Path(args.out), args.items)
    cache = Path(args.out) / "run"
    for f in cache.glob("file_checks-*.npz"):
        f.unlink()
    cache.mkdir(exist_ok=True)
    print(f"{platform.machine()}, {os.cpu_count()} cores, {default_workers()} worker processes; {real_recordings()[1]}")
    print("| step | items | seconds | per item | note |\n| --- | --- | --- | --- | --- |")
    t = time.perf_counter()
    files = list_file_names(str(csv))
    _row("read the CSV list (FileList)", len(files), time.perf_counter() - t)
    if not args.skip_sequential:
        t = time.perf_counter()
        check_files(list(files), 80, 0.16, 16)
        _row("header checks, one after another (before)", len(files), time.perf_counter() - t, "every start, every rank")
    t = time.perf_counter()
    check_files_once(files, 80, 0.16, 16, cache_dir=cache)
    _row("first start: parallel checks, saved", len(files), time.perf_counter() - t, "once per data set and node")
    t = time.perf_counter()
    check_files_once(files, 80, 0.16, 16, cache_dir=cache)
    _row("resume / restart: stat + saved result", len(files), time.perf_counter() - t, "sizes and times compared")
    t = time.perf_counter()
    check_files_once(files, 80, 0.16, 16, cache_dir=cache, reuse_only=True)
    _row("another rank of the node: saved result only", len(files), time.perf_counter() - t, "after the barrier")


def _uss(pids):
    import psutil
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().uss
        except psutil.Error:
            pass
    return total


def memory(args) -> None:
    """USS of the main process and its loader workers over the first steps, with the old list of Path objects and
    with FileList; the items are real file names (the loader reads one real clip per item)."""
    import psutil
    import torch
    from torch.utils.data import DataLoader

    from fastm2d.data import CropDataset, LogMelSource
    from fastm2d.data.sources import list_files
    csv = corpus(Path(args.out), args.items)
    files = list_files(str(csv))
    print(f"{platform.machine()}, {os.cpu_count()} cores; {args.items:,} items, {args.workers} workers, "
          f"{args.steps} batches of {args.batch}")
    print("| item list | main USS | workers USS (sum) | per worker | total per 1M items |\n| --- | --- | --- | --- | --- |")
    for kind in ("list of Path (before)", "FileList"):
        source = LogMelSource(files[:1], pad_to=16000 * 2)
        source.files = list(files) if kind.startswith("list") else __import__(
            "fastm2d.data.file_list", fromlist=["FileList"]).FileList(files)
        ds = CropDataset(source, 208)
        loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                            generator=torch.Generator().manual_seed(0))
        it = iter(loader)
        for _ in range(args.steps):
            next(it)
        me = psutil.Process()
        workers = [c.pid for c in me.children(recursive=True)]
        main, kids = _uss([me.pid]), _uss(workers)
        per_m = (main + kids) / args.items * 1e6
        print(f"| {kind} | {main / 2**20:.0f} MiB | {kids / 2**20:.0f} MiB | {kids / max(len(workers), 1) / 2**20:.0f} MiB "
              f"| {per_m / 2**20:.0f} MiB |", flush=True)
        del it, loader
        time.sleep(1)


def index(args) -> None:
    """Open a store whose index has `rows` rows (a synthetic index over one tiny shard)."""
    import json

    from fastm2d.data import LogMelStore
    out = Path(args.out) / "store"
    if not (out / "index.tsv").is_file() or sum(1 for _ in open(out / "index.tsv")) < args.rows:
        _synthetic_store(out, args.rows)
    t = time.perf_counter()
    store = LogMelStore(out)
    seconds = time.perf_counter() - t
    print(f"| open a store index | {len(store):,} rows | {seconds:.2f} s | {seconds / len(store) * 1e6:.2f} us/row |")
    json.dumps(store.norm_stats)


def _synthetic_store(out: Path, rows: int) -> None:
    """A real prepared store of 8 clips whose index is repeated to `rows` rows (every row a valid item)."""
    import subprocess
    src = Path(out).parent / "src"
    sources, _ = real_recordings()
    src.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(sources):
        if not (src / f"{i}.wav").exists():
            os.link(s, src / f"{i}.wav")
    subprocess.run([sys.executable, "-m", "fastm2d.cli", "prepare", str(src), "--out", str(out), "--workers", "0",
                    "--stats-items", "8"], check=True, capture_output=True)
    lines = (out / "index.tsv").read_text().splitlines(keepends=True)
    header, body = (lines[0], lines[1:]) if lines[0].startswith("name") else ("", lines)
    with open(out / "index.tsv", "w") as f:
        f.write(header)
        for i in range(rows):
            f.write(body[i % len(body)])
    import json
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("items", "n_items"):
        if key in manifest:
            manifest[key] = rows
    (out / "manifest.json").write_text(json.dumps(manifest))


GPU_APPETITE = 4700  # samples/s: ViT-B 80x608 at 50 % MFU on one H100 (docs/architecture.md "The speed model")


def throughput(args) -> None:
    """Crops/s per loader worker (one worker process) for each path, on 10 s clips; cores to feed the GPU."""
    import torch

    from data_cases import dali_rate, make_clips, prepare_rate, reference_loader_rate, shard_loader_rate
    out = Path(args.out)
    clips = make_clips(out / "wav", args.clips)
    flac = out / "flac"
    if not flac.is_dir():
        import soundfile as sf
        flac.mkdir(parents=True)
        for c in clips:
            data, sr = sf.read(str(c))
            sf.write(str(flac / (c.stem + ".flac")), data, sr)
    store = out / "store"
    if not (store / "manifest.json").is_file():
        prepare_rate(out / "wav", store, 1)
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.clips} clips of 10 s, "
          f"80x608 crops")
    print("| path | crops/s per worker | cores for 4,700 crops/s |\n| --- | --- | --- |")
    rows = [("prepared store (fp16 shards, memory-mapped)", shard_loader_rate(store, 1, batch=64, batches=20)),
            ("raw WAV, reference front end", reference_loader_rate(sorted((out / "wav").glob("*.wav")), 1)),
            ("raw FLAC, reference front end", reference_loader_rate(sorted(flac.glob("*.flac")), 1))]
    try:
        rows.append(("DALI, CPU operators (1 thread)", dali_rate([str(c) for c in clips], torch.device("cpu"), 1)))
    except Exception as e:  # DALI not installed or no CPU operators here
        print(f"(DALI skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} | {GPU_APPETITE / rate:.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("startup")
    s.add_argument("--items", type=int, default=200_000)
    s.add_argument("--out", required=True)
    s.add_argument("--skip-sequential", action="store_true")
    m = sub.add_parser("memory")
    m.add_argument("--items", type=int, default=1_000_000)
    m.add_argument("--workers", type=int, default=2)
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--out", required=True)
    i = sub.add_parser("index")
    i.add_argument("--rows", type=int, default=2_000_000)
    i.add_argument("--out", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--clips", type=int, default=64)
    t.add_argument("--out", required=True)
    args = p.parse_args()
    {"startup": startup, "memory": memory, "index": index, "throughput": throughput}[args.what](args)


if __name__ == "__main__":
    main()
