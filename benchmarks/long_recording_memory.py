"""Peak memory of `fastm2d embed` on one long recording, against its length: read in windows (transfer/long_audio.py)
memory stays at a window's worth; decoded whole, it grows with the length.

    python benchmarks/long_recording_memory.py [--minutes 1,10,60,120] [--whole 1,10] [--model vit_b] [--out FILE.md]

Each run is its own process (`fastm2d embed --level frame`, the CLI's path), its peak resident memory read from
/proc/self/status (VmHWM) at its end; the recording a 16 kHz 16-bit WAV of tones and noise. `--whole`: the same
lengths with windows switched off (every file decoded and encoded whole, as before), for comparison.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys, time
import fastm2d.transfer.long_audio as long_audio
if sys.argv[1] == "whole":
    long_audio.WINDOW_CHUNKS = 10 ** 9  # nothing counts as long: decoded and encoded whole
from fastm2d.cli import main
t0 = time.perf_counter()
assert main(["embed", "--weights", sys.argv[2], "--out", sys.argv[3], "--quiet", "--workers", "0", sys.argv[4]]) == 0
seconds = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(f"RESULT {int(hwm) / 1024:.0f} {seconds:.1f}")
"""


def write_recording(path: Path, minutes: float) -> None:
    import soundfile as sf
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", 16000, 1, subtype="PCM_16") as f:
        for start in range(0, int(minutes * 60), 60):  # a minute at a time: the writer's memory stays small
            t = np.arange(16000 * min(60, int(minutes * 60) - start)) / 16000
            f.write((0.2 * np.sin(2 * np.pi * (200 + start % 700) * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32))


def run(mode: str, weights: Path, out: Path, audio: Path) -> tuple:
    env = dict(os.environ, PYTHONPATH=str(ROOT), FASTM2D_PRECISION="fp32")
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(weights), str(out), str(audio)], capture_output=True,
                       text=True, env=env)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
    if r.returncode or not line:
        return None, (r.stderr.strip().splitlines() or ["?"])[-1][:120]
    mb, seconds = line[0].split()[1:]
    return float(mb), float(seconds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", default="1,10,60,120")
    ap.add_argument("--whole", default="1,10", help="lengths also run decoded whole, for comparison")
    ap.add_argument("--model", choices=("tiny", "vit_b"), default="vit_b")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.model_cases import emit, random_checkpoint
    lines = [f"embed of one long recording, peak memory (VmHWM), {platform.machine()} ({os.cpu_count()} CPUs), torch "
             f"{torch.__version__}, {time.strftime('%Y-%m-%d')}; model {args.model}, fp32, 16 kHz WAV", "",
             "| length | read | peak memory | time | frames written |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        random_checkpoint(folder / "w.pth", args.model)
        whole = {float(m) for m in args.whole.split(",") if m}
        for minutes in [float(m) for m in args.minutes.split(",")]:
            audio = folder / f"rec{minutes:g}.wav"
            write_recording(audio, minutes)
            for mode in ["windows"] + (["whole"] if minutes in whole else []):
                out = folder / f"out-{mode}-{minutes:g}"
                mb, seconds = run(mode, folder / "w.pth", out, audio)
                frames = np.load(out / f"rec{minutes:g}.npy", mmap_mode="r").shape[0] if mb is not None else "-"
                cell = f"{mb:,.0f} MB" if mb is not None else f"failed: {seconds}"
                lines.append(f"| {minutes:g} min | {'in windows' if mode == 'windows' else 'whole file'} | {cell} | "
                             f"{seconds if mb is None else f'{seconds:.0f} s'} | {frames} |")
                print(lines[-1], flush=True)
            audio.unlink()
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
