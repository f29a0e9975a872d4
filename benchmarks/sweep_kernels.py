"""Kernel sweeps: each kernel over the sizes users run, for every provider, as a CSV and a plot of GB/s against the
card's copy bandwidth (Liger-Kernel's and Triton's perf_report style).

    python benchmarks/sweep_kernels.py --out results/sweep          # a GPU: the full sweep (Triton, compiled
                                                                    # reference, eager reference), ~5-10 minutes
    python benchmarks/sweep_kernels.py --out /tmp/sweep --tiny      # CPU dry run: the references at small sizes

Axes, one at a time around M2D ViT-B's point (batch 512, N = 191 tokens, D = 768): the width D (384 ViT-S, 768 ViT-B,
1024 ViT-L, 3840 a wide M2D-X teacher), the tokens per clip N (58 visible, 134 masked, 191, 304 = 80x1001 16x16
... at mask 0.7), and the batch. noise_mix works on whole 80x608 crops, so it sweeps the batch alone; the EMA's size
is the model's, so it has no sweep (the device suite times it). Each row: GB/s from the minimum bytes (each input
read once, each output written once), and on CUDA the peak memory one call allocates beyond its inputs.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_cases import CASES, time_median  # noqa: E402

GPU_POINT, TINY_POINT = (512, 191, 768), (2, 58, 64)
GPU_AXES = {"D": (384, 768, 1024, 3840), "N": (58, 134, 191, 304), "batch": (64, 256, 512, 1024)}
TINY_AXES = {"D": (64, 128), "N": (58, 134), "batch": (1, 2)}
SWEPT = {"l2norm_mse": ("D", "N", "batch"), "gather_visible": ("D", "N", "batch"), "noise_mix": ("batch",)}
FIELDS = ["kernel", "provider", "mode", "axis", "batch", "N", "D", "ms", "min_MB", "GB_s", "pct_copy_bw",
          "peak_extra_MB"]


def sizes(axis: str, point, axes) -> list:
    index = {"batch": 0, "N": 1, "D": 2}[axis]
    return [tuple(v if i == index else p for i, p in enumerate(point)) for v in axes[axis]]


def copy_bandwidth(device: torch.device, tiny: bool) -> float:
    x = torch.empty((2**24 if tiny else 2**28), device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / time_median(lambda: y.copy_(x), device) / 1e9


def measure(kernel: str, provider: str, size, dtype, device, bandwidth: float) -> dict:
    fns, moved = CASES[kernel](provider, size, dtype, device)
    sec = time_median(fns["full"], device)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fns["full"]()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 1e6
    gbs = moved["full"].minimum / sec / 1e9
    b, n, d = size
    return {"kernel": kernel, "provider": provider, "mode": "full", "batch": b, "N": n, "D": d, "ms": sec * 1e3,
            "min_MB": moved["full"].minimum / 1e6, "GB_s": gbs, "pct_copy_bw": 100 * gbs / bandwidth,
            "peak_extra_MB": peak}


def plot(rows: list, bandwidth: float, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(k, a) for k, axes in SWEPT.items() for a in axes]
    cols = 4
    rows_n = -(-len(panels) // cols)
    fig, axs = plt.subplots(rows_n, cols, figsize=(3.4 * cols, 3.0 * rows_n), squeeze=False)
    for ax in axs.flat[len(panels):]:
        ax.axis("off")
    for ax, (kernel, axis) in zip(axs.flat, panels):
        for provider in sorted({r["provider"] for r in rows}):
            pts = sorted((r[axis], r["GB_s"]) for r in rows
                         if r["kernel"] == kernel and r["axis"] == axis and r["provider"] == provider)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider)
        ax.axhline(bandwidth, color="grey", linestyle="--", label="copy")
        ax.set_title(f"{kernel} vs {axis}", fontsize=9)
        ax.set_xlabel(axis)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # the CPU's references sit far below the copy line; a GPU's kernels near it
        ax.grid(alpha=0.3)
        ax.set_ylabel("GB/s (minimum bytes)", fontsize=8)
    axs[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/sweep")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: the references at small sizes")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print("sweep_kernels: no CUDA device here; use --tiny for the CPU dry run", file=sys.stderr)
        return 2
    point, axes = (TINY_POINT, TINY_AXES) if args.tiny else (GPU_POINT, GPU_AXES)
    providers = ("eager",) if device.type != "cuda" else ("triton", "compile", "eager")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth(device, args.tiny)
    rows = []
    with open(out / "kernel_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for kernel, swept in SWEPT.items():
            for axis in swept:
                for size in sizes(axis, point, axes):
                    for provider in providers:
                        try:
                            row = {**measure(kernel, provider, size, dtype, device, bandwidth), "axis": axis}
                        except Exception as e:  # an OOM at the widest size is that row's, not the sweep's end
                            print(f"{kernel} {provider} {size}: {type(e).__name__}: {e}"[:300], file=sys.stderr)
                            continue
                        rows.append(row)
                        writer.writerow(row)
                        f.flush()
                        print(f"{kernel:15s} {provider:8s} {axis:5s} {size}: {row['ms']:.3f} ms, "
                              f"{row['GB_s']:.1f} GB/s ({row['pct_copy_bw']:.0f} % of copy)", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores (dry run)"
    plot(rows, bandwidth, out / "kernel_sweep.png",
         f"{name}, {str(dtype).replace('torch.', '')}, torch {torch.__version__}; copy {bandwidth:.0f} GB/s")
    print(f"{len(rows)} rows: {out / 'kernel_sweep.csv'}, {out / 'kernel_sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
