"""`fastm2d embed` over a corpus: clips/s and where the time goes (decode and resample, front end, encoder, writing),
with the decoder in 0, 1, 2 ... DataLoader workers.

    python benchmarks/embed_throughput.py [--files 10000] [--model tiny|vit_b] [--workers 0,2] [--out FILE.md]

The corpus: recorded sound (LMMS's sample library: OGG, FLAC and WAV at 44.1 kHz, 0.1-10 s; `python
benchmarks/real_sounds.py fetch`), its files hard-linked under distinct names up to `--files` inputs, so every input
is decoded and resampled on its own as in a real corpus; without the package, generated 44.1 kHz FLAC clips.
`tiny` (64 wide, 2 blocks) makes the decoding the bottleneck on purpose (what the workers buy); `vit_b` shows
the encoder's share with the release-sized model.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def corpus(folder: Path, n: int) -> str:
    from benchmarks.real_sounds import sound_files
    from fastm2d.errors import AudioReadError
    from fastm2d.frontend import sound_info
    sources = []
    for f in sound_files("lmms-common", "usr/share/lmms/samples"):
        try:
            frames, sr = sound_info(f)
            if frames > 0:
                sources.append(f)
        except (AudioReadError, RuntimeError, OSError, Exception):  # noqa: BLE001 - LMMS ships a few unreadable
            continue
    what = f"{len(sources)} LMMS recordings"
    if not sources:
        import soundfile as sf
        rng = np.random.default_rng(0)
        for i in range(50):
            p = folder / f"gen{i}.flac"
            sf.write(str(p), (0.1 * rng.standard_normal(44100 * (1 + i % 5))).astype(np.float32), 44100)
            sources.append(p)
        what = "50 generated 44.1 kHz FLAC clips"
    (folder / "corpus").mkdir()
    for i in range(n):
        src = sources[i % len(sources)]
        os.link(src, folder / "corpus" / f"{i:05d}{src.suffix}")
    return what


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--model", choices=("tiny", "vit_b"), default="tiny")
    ap.add_argument("--workers", default="0,2", help="comma-separated decoding worker counts to compare")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", help="write the markdown table here")
    args = ap.parse_args(argv)
    from benchmarks.model_cases import emit, random_checkpoint
    from fastm2d.transfer.embed_corpus import embed_corpus
    from fastm2d.transfer.runtime import load_encoder
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        what = corpus(folder, args.files)
        rt = load_encoder(random_checkpoint(folder / "w.pth", args.model))
        lines += [f"embed throughput, {platform.machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
                  f"{time.strftime('%Y-%m-%d')}: {args.files} inputs from {what}, model {args.model}, "
                  f"batch {args.batch_size}, precision {rt.precision}", "",
                  "| workers | clips/s | decode and resample | front end | encoder | writing |", "|---|---|---|---|---|---|"]
        for workers in [int(w) for w in args.workers.split(",")]:
            stats = embed_corpus(rt, [str(folder / "corpus")], folder / f"out{workers}", level="clip",
                                 batch_size=args.batch_size, workers=workers, progress=False)
            total = max(sum(stats["seconds"].values()), 1e-9)
            parts = " | ".join(f"{v:.1f} s ({100 * v / total:.0f} %)" for v in stats["seconds"].values())
            lines.append(f"| {workers} | {stats['clips_per_s']:.1f} | {parts} |")
            print(lines[-1], flush=True)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
