"""AudioSet-scale start-up and memory, measured on lists of real files (hard links to a few real recordings make a
200k- or 1M-item corpus cheap: each link is a file of its own to stat and to read a header from).

    python benchmarks/scale.py startup --items 200000 --out DIR     # file checks: old sequential, first, resume
    python benchmarks/scale.py memory --items 1000000 --workers 2 --out DIR   # USS of the loader, list vs FileList
    python benchmarks/scale.py index --rows 2000000 --out DIR      # opening a prepared store's index
    python benchmarks/scale.py throughput --out DIR                # crops/s per worker: store, WAV, FLAC, DALI
    python benchmarks/scale.py workflow --items 200000 --out DIR   # the README's prepare -> pretrain -> resume
    python benchmarks/scale.py embed --clips 32 --out DIR          # fastm2d embed with a ViT-B: clips/s

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


def real_recordings(n: int = 48):
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
    """out/corpus.csv listing `items` hard links (a few dozen real files, linked over and over: ext4 allows 65,000
    links per file)."""
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
    # A new run (an ablation) on the same list, as `pretrain` opens it: a fresh run folder, the checks found in
    # the user cache (data.check_cache unset), the first time computed and saved there.
    from fastm2d.config import load_config
    from fastm2d.data.open_source import check_cache_dir, file_source
    os.environ["FASTM2D_CACHE"] = str(Path(args.out) / "user_cache")
    for f in Path(args.out, "user_cache").rglob("file_checks-*.npz"):
        f.unlink()
    for k, what in enumerate(("first run on the list (checks saved in the user cache)",
                              "a second, fresh run on the same list")):
        config = load_config(None, ["model.input_size=[80,608]", "train.progress=false",
                                    f"out_dir={Path(args.out) / f'fresh{k}'}"])
        t = time.perf_counter()
        file_source(str(csv), config, cache_dir=check_cache_dir(config, Path(config.out_dir)))
        _row(what, len(files), time.perf_counter() - t, "open_source's path, list read included")


def _mem(pids, field: str = "uss"):
    """Summed USS (pages only that process holds) or PSS (every page shared by k processes counted 1/k: the
    group's true physical total, which USS alone misses for pages a parent shares with its forked workers)."""
    import psutil
    total = 0
    for pid in pids:
        try:
            total += getattr(psutil.Process(pid).memory_full_info(), field)
        except psutil.Error:
            pass
    return total


def memory(args) -> None:
    """USS of the main process and its loader workers after the first steps, with the old list of Path objects
    and with FileList, each in a fresh process; the items are real files (one real clip read per item)."""
    import subprocess
    csv = corpus(Path(args.out), args.items)
    if args.kind:
        return _memory_one(args, csv)
    print(f"{platform.machine()}, {os.cpu_count()} cores; {args.items:,} items, {args.workers} workers, "
          f"{args.steps} batches of {args.batch}")
    print("| item list | main USS | workers USS (sum) | per worker USS | all processes PSS | PSS per 1M items |\n"
          "| --- | --- | --- | --- | --- | --- |", flush=True)
    for kind in ("paths", "filelist"):
        subprocess.run([sys.executable, __file__, "memory", "--items", str(args.items), "--workers", str(args.workers),
                        "--steps", str(args.steps), "--batch", str(args.batch), "--out", args.out, "--kind", kind],
                       check=True)


def _memory_one(args, csv) -> None:
    import gc

    import psutil
    import torch
    from torch.utils.data import DataLoader

    from fastm2d.data import CropDataset, EpochSampler, LogMelSource
    from fastm2d.data.sources import list_file_names, list_files
    files = list_files(str(csv)) if args.kind == "paths" else list_file_names(str(csv))
    source = LogMelSource([], pad_to=16000 * 2)
    source.files = files  # the trainer's source, holding the list as each version did
    gc.collect()
    ds = CropDataset(source, 208)
    loader = DataLoader(ds, batch_size=args.batch, sampler=EpochSampler(len(ds), args.batch, seed=0),
                        num_workers=args.workers, drop_last=True, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    for _ in range(args.steps):
        next(it)
    me = psutil.Process()
    workers = [c.pid for c in me.children(recursive=True)]
    main, kids, pss = _mem([me.pid]), _mem(workers), _mem([me.pid, *workers], "pss")
    name = "list of Path (before)" if args.kind == "paths" else "FileList"
    print(f"| {name} | {main / 2**20:.0f} MiB | {kids / 2**20:.0f} MiB | {kids / max(len(workers), 1) / 2**20:.0f} MiB "
          f"| {pss / 2**20:.0f} MiB | {pss / args.items * 1e6 / 2**20:.0f} MiB |", flush=True)


def index(args) -> None:
    """Open a store whose index has `rows` rows (a synthetic index over one tiny shard)."""
    import json

    from fastm2d.data import LogMelStore
    out = Path(args.out) / "store"
    if not (out / "index.tsv").is_file() or sum(1 for _ in open(out / "index.tsv")) < args.rows:
        _synthetic_store(out, args.rows)
    (out / "index.npz").unlink(missing_ok=True)
    print("| opening | rows | seconds | per row |\n| --- | --- | --- | --- |")
    for what in ("first (parses index.tsv, writes index.npz)", "every later one (index.npz)"):
        t = time.perf_counter()
        store = LogMelStore(out)
        seconds = time.perf_counter() - t
        print(f"| {what} | {len(store):,} | {seconds:.2f} s | {seconds / len(store) * 1e6:.2f} us |", flush=True)
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


def workflow(args) -> None:
    """The README's "Data at scale" commands, end to end, on a corpus of real files and the tiny model."""
    import shlex
    import subprocess
    out = Path(args.out)
    csv = corpus(out, args.items)
    store, run = out / "as_store", out / "run"
    tiny = ("model.size=tiny model.embed_dim=64 model.depth=2 model.num_heads=2 model.decoder_embed_dim=32 "
            "model.decoder_depth=1 model.decoder_num_heads=2 model.input_size=[80,208] train.batch_size=16 "
            "train.max_steps=20 train.accum_steps=1 train.save_every=10 train.log_every=5 data.num_workers=2 "
            "train.progress=false")
    commands = [f"fastm2d prepare {csv} --out {store} --workers {os.cpu_count()} --crop-frames 208",
                f"fastm2d pretrain --config configs/m2d_vit_base.yaml data.train={store} out_dir={run} {tiny}",
                f"fastm2d pretrain --config configs/m2d_vit_base.yaml data.train={store} out_dir={run} {tiny} "
                f"train.max_steps=30 --resume"]
    print(f"{platform.machine()}, {os.cpu_count()} cores; {args.items:,} items")
    print("| command | seconds |\n| --- | --- |")
    for c in commands:
        t = time.perf_counter()
        r = subprocess.run(shlex.split(c), capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            raise SystemExit(f"{c}\n{r.stderr[-2000:]}")
        print(f"| `{c.replace(str(out), 'OUT')}` | {time.perf_counter() - t:.1f} |", flush=True)


from fastm2d.train.flops import MILESTONE_SAMPLES_PER_S  # noqa: E402

GPU_APPETITE = MILESTONE_SAMPLES_PER_S  # ViT-B 80x608 at the first MFU milestone (40 %) on one H100 SXM


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


def embed(args) -> None:
    """`fastm2d embed` over generated 10 s clips with a ViT-B (random weights): clips/s on this machine."""
    import torch

    from data_cases import embed_rate, make_clips
    out = Path(args.out)
    clips = make_clips(out / "wav", args.clips)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rate = embed_rate(clips, device, out / f"run{time.time_ns()}", batch=args.batch, workers=args.workers)
    print(f"{platform.machine()}, {os.cpu_count()} cores, {device}; ViT-B 80x608 16x16, {args.clips} clips of 10 s")
    print(f"| embed a corpus | {rate:.2f} clips/s | batch {args.batch}, {args.workers} decoding workers |")


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
    m.add_argument("--steps", type=int, default=200)
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--out", required=True)
    m.add_argument("--kind", choices=("paths", "filelist"), help=argparse.SUPPRESS)
    i = sub.add_parser("index")
    i.add_argument("--rows", type=int, default=2_000_000)
    i.add_argument("--out", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--clips", type=int, default=64)
    t.add_argument("--out", required=True)
    w = sub.add_parser("workflow")
    w.add_argument("--items", type=int, default=200_000)
    w.add_argument("--out", required=True)
    e = sub.add_parser("embed")
    e.add_argument("--clips", type=int, default=32)
    e.add_argument("--batch", type=int, default=16)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--out", required=True)
    args = p.parse_args()
    {"embed": embed, "startup": startup, "memory": memory, "index": index, "throughput": throughput, "workflow": workflow}[args.what](args)


if __name__ == "__main__":
    main()
