"""Streamed tar shards beside the other data paths: crops/s per loader worker and the memory of a loader group.

    python benchmarks/streamed_shards.py /tmp/shardbench [--clips 160] [--rounds 3]

Builds 10 s clips (benchmarks/data_cases.make_clips) as WAV and as FLAC, `prepare --format shards` of each,
`--format logmel-shards` of the WAV, and a prepared store, then times, round-robin over the paths (each round every path once, so drift hits all alike):
the reference loader on the WAV and FLAC files, shards of each from a local path, WAV and log-mel shards over HTTP
(`python -m http.server` on 127.0.0.1, a separate process), and the store. One worker per path; medians and
min-max over the rounds. The memory of a loader group: proportional set size (PSS: shared pages split among
the processes sharing them) of the main process and its workers, summed, while 2 workers stream (shards over
HTTP) or read files, after the warm-up batches; and each worker's unique set size (USS).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.data_cases import make_clips, reference_loader_rate, shard_loader_rate, streamed_shard_rate  # noqa: E402


def flac_copies(files, folder: Path) -> list:
    import soundfile as sf
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = folder / (f.stem + ".flac")
        if not target.exists():
            data, sr = sf.read(str(f), dtype="int16")
            sf.write(str(target), data, sr, subtype="PCM_16")
        out.append(target)
    return out


def shards_of(src: Path, out: Path, per_shard: int, logmel: bool = False) -> str:
    from fastm2d.data.shards import write_shards
    if not (out / "shards.json").is_file():
        write_shards(str(src), out, per_shard, progress=False, workers=2,
                     logmel=dict(sample_rate=16000, crop_frames=608, dtype="float16", min_patch_frames=16)
                     if logmel else None)
    n = len(json.loads((out / "shards.json").read_text())["shards"])
    return f"{out}/shard-{{000000..{n - 1:06d}}}.tar"


def http_server(folder: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


def group_memory(iterator, warmup: int = 4, batches: int = 8) -> dict:
    """PSS of this process and its loader workers summed (MB), and each worker's USS, after `warmup` batches."""
    import psutil
    for _ in range(warmup):
        next(iterator)
    me = psutil.Process()
    samples = []
    for _ in range(batches):
        next(iterator)
        infos = []
        for p in [me, *me.children(recursive=True)]:  # loader workers, and the curl each HTTP fetch runs
            try:
                infos.append(p.memory_full_info())
            except psutil.NoSuchProcess:  # a fetch that ended meanwhile
                pass
        samples.append((sum(i.pss for i in infos) / 2**20, [i.uss / 2**20 for i in infos[1:]]))
    pss = max(s[0] for s in samples)
    uss = max((u for s in samples for u in s[1]), default=0.0)
    return {"group_pss_mb": round(pss), "worker_uss_mb_max": round(uss), "workers": len(samples[-1][1])}


def shard_iterator(spec: str, workers: int, batch: int = 16):
    from fastm2d.data.shards import ShardBatches, ShardCrops, ShardSource
    from fastm2d.frontend import pad_samples
    source = ShardSource(spec, 16000, 608, pad_samples(16000, 608), stats_items=1)
    return iter(ShardBatches(ShardCrops(source, 0, 0, 0, 1, 40, batch), workers))


def file_iterator(files, workers: int, batch: int = 16):
    from fastm2d.data import CropDataset, EpochSampler, LogMelSource
    ds = CropDataset(LogMelSource(files), 608)
    sampler = EpochSampler(len(ds), batch, seed=0, min_epoch_items=batch * 40)
    return iter(DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--clips", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    wavs = make_clips(args.folder / "wav", args.clips)
    flacs = flac_copies(wavs, args.folder / "flac")
    per_shard = max(1, args.clips // 8)
    wav_shards = shards_of(args.folder / "wav", args.folder / "wav_shards", per_shard)
    flac_shards = shards_of(args.folder / "flac", args.folder / "flac_shards", per_shard)
    lms_shards = shards_of(args.folder / "wav", args.folder / "lms_shards", per_shard, logmel=True)
    store = args.folder / "store"
    if not (store / "manifest.json").is_file():
        from fastm2d.data.prepare import prepare
        prepare(str(args.folder / "wav"), store, workers=2, stats_items=64, progress=False)
    server, base = http_server(args.folder)
    http_spec = f"{base}/wav_shards/{Path(wav_shards).name}"
    http_lms = f"{base}/lms_shards/{Path(lms_shards).name}"
    paths = {
        "raw WAV files, reference front end": lambda: reference_loader_rate(wavs, 1),
        "raw FLAC files, reference front end": lambda: reference_loader_rate(flacs, 1),
        "streamed shards of WAV, local path": lambda: streamed_shard_rate(wav_shards, 1),
        "streamed shards of FLAC, local path": lambda: streamed_shard_rate(flac_shards, 1),
        "streamed shards of WAV over HTTP (127.0.0.1)": lambda: streamed_shard_rate(http_spec, 1),
        "streamed log-mel shards (fp16), local path": lambda: streamed_shard_rate(lms_shards, 1, batches=30),
        "streamed log-mel shards (fp16) over HTTP (127.0.0.1)": lambda: streamed_shard_rate(http_lms, 1, batches=30),
        "prepared store (fp16 log-mel)": lambda: shard_loader_rate(store, 1),
    }
    try:
        rates = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, run in paths.items():
                rates[name].append(run())
        memory = {}
        for name, make in (("streamed shards over HTTP, 2 workers", lambda: shard_iterator(http_spec, 2)),
                           ("raw WAV files, 2 workers", lambda: file_iterator(wavs, 2))):
            iterator = make()
            memory[name] = group_memory(iterator)
            del iterator  # its workers end before the server does
    finally:
        server.terminate()
    print("| path | crops/s per worker (median) | min-max |\n| --- | --- | --- |")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.0f} | {min(r):.0f}-{max(r):.0f} |")
    print("\n| loader group | PSS of main + workers (MB, max over 8 batches) | largest worker USS (MB) |\n"
          "| --- | --- | --- |")
    for name, m in memory.items():
        print(f"| {name} | {m['group_pss_mb']} | {m['worker_uss_mb_max']} |")
    print(json.dumps({"rates": rates, "memory": memory}))


if __name__ == "__main__":
    main()
