"""ONE command for a GPU machine: GPU-marked tests + kernel and training-step benchmarks -> markdown + JSON.

    python benchmarks/device_suite.py --out "$OUT"          # on the GPU machine (~5 minutes)
    python benchmarks/device_suite.py --out /tmp/ds --tiny   # dry run on CPU with tiny sizes, first

Rows: each kernel x provider (triton / eager reference / torch.compile of the reference) x mode, with achieved
GB/s, the share of the card's measured copy bandwidth and the speed-up over compile; then training steps with
kernels off and on. The short table is printed last; the header names the card and the versions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from kernel_cases import CASES, MODES, PROVIDERS, time_median  # noqa: E402


EMA_LABELS = {"triton": "flat lerp_", "eager": "foreach_lerp_ (used)", "compile": "compiled foreach"}


DEADLINE = [float("inf")]  # monotonic time after which remaining rows are skipped (set from --budget-s)


def over_budget() -> bool:
    return time.monotonic() > DEADLINE[0]


def header(device: torch.device) -> dict:
    import triton
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'}, {os.cpu_count()} cores)"
    return {"card": card, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def copy_bandwidth(device: torch.device, tiny: bool) -> float:
    """GB/s of a plain device-to-device copy (read + write), the yardstick for memory-bound kernels."""
    x = torch.empty(int(2**26 if tiny else 2**30) // 4, device=device)
    y = torch.empty_like(x)
    sec = time_median(lambda: y.copy_(x), device)
    return 2 * x.numel() * 4 / sec / 1e9


def gpu_tests(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"summary": "skipped: no CUDA device", "rc": None}
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(HERE.parent / "tests")],
                           capture_output=True, text=True, timeout=max(30, min(240, DEADLINE[0] - time.monotonic())))
    except subprocess.TimeoutExpired:
        return {"summary": "TIMED OUT (GPU tests did not finish in their share of the budget)", "rc": None}
    return {"summary": (r.stdout.strip().splitlines() or ["(no output)"])[-1], "rc": r.returncode,
            "seconds": round(time.perf_counter() - t0, 1)}


def kernel_rows(device: torch.device, tiny: bool, bandwidth: float) -> list:
    size, dtype = ("tiny", torch.float32) if tiny else ("m2d", torch.bfloat16)
    rows = []
    for kernel, make in CASES.items():
        times = {}
        for provider in PROVIDERS:
            if over_budget():
                rows.append({"kernel": kernel, "provider": provider, "mode": "-", "error": "skipped: time budget"})
                continue
            if provider == "triton" and device.type != "cuda":
                if kernel != "ema":  # the flat-buffer EMA row is plain PyTorch and runs anywhere
                    continue  # the interpreter times NumPy, not the kernel
            if provider == "compile" and device.type != "cuda":
                continue  # minutes of C++ builds on CPU, and not the comparison that matters
            try:
                fns, moved = make(provider, size, dtype, device)
                for mode in (MODES if kernel != "ema" else ("full",)):
                    sec = time_median(fns[mode], device)
                    times[(provider, mode)] = sec
                    label = EMA_LABELS.get(provider, provider) if kernel == "ema" else provider
                    rows.append({"kernel": kernel, "provider": label, "mode": mode, "ms": sec * 1e3,
                                 "GB_s": moved[mode] / sec / 1e9, "pct_copy_bw": 100 * moved[mode] / sec / 1e9 / bandwidth})
            except Exception as e:  # a failing provider is a row, not the end of the suite
                rows.append({"kernel": kernel, "provider": provider, "mode": "-", "error": repr(e)[:200]})
        for r in rows:
            if r["kernel"] == kernel and ("compile", r["mode"]) in times and "ms" in r:
                r["speedup_vs_compile"] = times[("compile", r["mode"])] * 1e3 / r["ms"]
    return rows


def train_rows(device: torch.device, tiny: bool) -> list:
    """The training-step ladder (ladder.py): ViT-B at a batch that fills an 80 GB card, the demo model on CPU."""
    from ladder import CPU_RUNGS, RUNGS, ladder

    if tiny:
        return ladder("demo", 4, CPU_RUNGS[:2], steps=2, stop=over_budget)
    return ladder("vit_base", 512, RUNGS, steps=5, stop=over_budget)


def data_rows(device: torch.device, tiny: bool) -> list:
    """Shard loader (all cores), reference loader and DALI (GPU when present) on generated 10 s clips."""
    import tempfile

    from data_cases import dali_rate, embed_rate, make_clips, prepare_rate, reference_loader_rate, shard_loader_rate
    from fastm2d.data.dali import dali_missing_reason

    workers = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clips = Path(tmp) / "clips"
        files = make_clips(clips, 16 if tiny else 256)
        summary = prepare_rate(clips, Path(tmp) / "store", workers)
        rows.append({"path": "prepare", "workers": workers, "rate": summary["files_per_s"], "unit": "files/s"})
        rows.append({"path": "reference loader", "workers": workers, "unit": "crops/s",
                     "rate": reference_loader_rate(files, workers, batch=8, batches=2 if tiny else 8)})
        rows.append({"path": "shard loader", "workers": workers, "unit": "crops/s",
                     "rate": shard_loader_rate(Path(tmp) / "store", workers, batch=32 if tiny else 256,
                                               batches=3 if tiny else 20)})
        if dali_missing_reason():
            rows.append({"path": "DALI", "workers": workers, "unit": "clips/s", "note": dali_missing_reason()})
        else:
            rows.append({"path": f"DALI ({device.type})", "workers": workers, "unit": "clips/s",
                         "rate": dali_rate(files, device, workers, batch=8 if tiny else 64, epochs=1 if tiny else 2)})
        rows.append({"path": f"embed a corpus, ViT-B ({device.type})", "workers": min(workers, 8), "unit": "clips/s",
                     "rate": embed_rate(files[:16 if tiny else 256], device, Path(tmp), batch=16 if tiny else 64,
                                        workers=min(workers, 8))})
    return rows


def markdown(result: dict) -> str:
    h = result["header"]
    lines = [f"# fastm2d device suite: {h['card']}", "",
             f"torch {h['torch']}, triton {h['triton']}, Python {h['python']}, {h['date']}; "
             f"copy bandwidth {result['copy_GB_s']:.0f} GB/s; GPU tests: {result['gpu_tests']['summary']}", "",
             "| kernel | provider | mode | ms | GB/s | % copy BW | x vs compile |", "|---|---|---|---|---|---|---|"]
    for r in result["kernels"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['provider']} | error | {r['error']} | | | |")
        else:
            lines.append(f"| {r['kernel']} | {r['provider']} | {r['mode']} | {r['ms']:.3f} | {r['GB_s']:.0f} | "
                         f"{r['pct_copy_bw']:.0f} | {r.get('speedup_vs_compile', float('nan')):.2f} |")
    train_lines = ["", "| train-step rung | batch | ms | samples/s | x eager | MFU | peak GiB | first step s |",
                   "|---|---|---|---|---|---|---|---|"]
    for r in result["train"]:
        if "note" in r:
            train_lines.append(f"| {r['rung']} | {r['note']} | | | | | | |")
            continue
        mfu_s = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        mem = f"{r['peak_GiB']:.1f}" if r.get("peak_GiB") else "-"
        train_lines.append(f"| {r['rung']} | {r['batch']} | {r['ms']:.1f} | {r['samples_s']:.1f} | {r['x_vs_eager']:.2f} | "
                           f"{mfu_s} | {mem} | {r['first_step_s']:.1f} |")
    lines += ["", "| data path | workers | rate |", "|---|---|---|"]
    for r in result["data"]:
        lines.append(f"| {r['path']} | {r['workers']} | " + (f"{r['rate']:.0f} {r['unit']}" if "rate" in r else r["note"]) + " |")
    return "\n".join(lines + train_lines) + "\n"  # the train-step table last: the short summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/latest"))
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU dry run)")
    ap.add_argument("--budget-s", type=float, default=450, help="skip the remaining rows after this many seconds")
    args = ap.parse_args()
    DEADLINE[0] = time.monotonic() + args.budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"header": header(device), "gpu_tests": {"summary": "not run"}, "copy_GB_s": float("nan"),
              "kernels": [], "train": [], "data": []}
    sections = [("gpu_tests", lambda: gpu_tests(device)), ("copy_GB_s", lambda: copy_bandwidth(device, tiny)),
                ("kernels", lambda: kernel_rows(device, tiny, result["copy_GB_s"])),
                ("train", lambda: train_rows(device, tiny)), ("data", lambda: data_rows(device, tiny))]
    for name, run in sections:  # in order of importance; results are written after each, so a kill keeps them
        try:
            result[name] = run()
        except Exception as e:  # a failed section (a missing package on the GPU machine) is a note, not the end
            note = f"failed: {e!r}"[:200]
            result[name] = {"summary": note} if name == "gpu_tests" else float("nan") if name == "copy_GB_s" else \
                [{"kernel": "-", "provider": "-", "mode": "-", "error": note, "rung": "-", "note": note,
                  "path": "-", "workers": "-"}]
        (out / "device_suite.json").write_text(json.dumps(result, indent=1))
        (out / "device_suite.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
