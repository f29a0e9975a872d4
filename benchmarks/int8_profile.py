"""Where the time of int8 CPU inference goes, by operator: what is left to gain above `--precision int8`.

    python benchmarks/int8_profile.py [--clips 4] [--out FILE.md]

ViT-B 80x608 (random weights: speed does not depend on them), `--clips` clips of 10 s, `Runtime.use_int8()` (the
linear layers in dynamic int8, the rest fp32), two warm-up calls, then one call under torch.profiler. The share of
everything that is not a linear layer bounds what fusing or compiling the rest could still gain.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.model_cases import cpu_name, cpu_vector_flags, emit, random_checkpoint  # noqa: E402
from fastm2d.transfer.runtime import load_encoder  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rt = load_encoder(str(random_checkpoint(Path(tmp) / "vit_b.pth"))).use_int8()
    lms = rt.to_lms(torch.randn(args.clips, 160000) * 0.1, 16000)
    with torch.inference_mode():
        for _ in range(2):
            rt.encode_lms(lms)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            rt.encode_lms(lms)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    lines = [f"int8 CPU inference by operator, {platform.machine()} ({cpu_name()}; {cpu_vector_flags()}), "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, {datetime.date.today()}; ViT-B 80x608, "
             f"{args.clips} clips of 10 s, one call: {total / 1e3:.0f} ms", "", "| operator | calls | self ms | share |", "|---|---|---|---|"]
    for e in rows[:8]:
        lines.append(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
                     f"{100 * e.self_cpu_time_total / total:.1f} % |")
    linear = sum(e.self_cpu_time_total for e in rows if e.key == "quantized::linear_dynamic")
    lines += ["", f"Everything but the int8 linear layers: {100 * (total - linear) / total:.1f} % of the time; "
                  f"removing all of it would make int8 at most {total / max(linear, 1):.2f}x faster than it is."]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
