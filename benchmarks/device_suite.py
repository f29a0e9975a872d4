"""ONE command for a GPU machine: GPU-marked tests + kernel, training-step and data benchmarks -> markdown + JSON.

    python benchmarks/device_suite.py --out "$OUT"          # on the GPU machine (about 5 minutes, below)
    python benchmarks/device_suite.py --out /tmp/ds --tiny   # the CPU dry run (CI): the same rungs, branches and
                                                             # config arithmetic at small sizes

Rows: each kernel x provider (triton / eager reference / torch.compile of the reference) x mode, with achieved
GB/s, the share of the card's measured copy bandwidth and the speed-up over compile; the training-step ladder
(benchmarks/ladder.py: fp32 -> bf16 -> attention -> compile -> Triton -> CUDA graphs, then the shipped ViT-B recipe
alone and under DeepSpeed) with samples/s and MFU (achieved model FLOPs / the card's dense bf16 data-sheet peak;
target 40 % = 4,700 samples/s of ViT-B on an H100 SXM); the data paths. Every row is written to $OUT as it
finishes (device_suite.json / .md; the GPU tests' whole log in gpu_tests.log), a failing row (OOM, compile error)
costs only that row, and rows past --budget-s are skipped with that reason, the data rows too.

How long, on one H100 / H200, from the parts (no GPU has run it yet: estimates, the budget enforces them):
GPU tests ~60 s (22 tests; each Triton kernel variant compiles in ~1-3 s); copy bandwidth ~1 s; kernels ~60 s
(4 kernels x 3 providers x 3 modes, a median of 20 runs each, torch.compile ~5-10 s per kernel); the ladder
~150 s (9 rungs: ViT-B at batch 512 is ~44 TFLOP per step, 0.1-1 s per step over 7 steps, plus ~30-40 s of
Inductor compilation for each of the 3 compiled rungs; the recipe steps 4 micro-batches); data ~30 s (256 clips
of 10 s). About 5 minutes with Python's start and imports; --budget-s (default 300) cuts rows beyond it, so the
call ends within 6 minutes.
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
if not torch.cuda.is_available():  # the dry run's Triton rung: kernels interpreted on CPU, as in the tests
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


def gpu_tests(device: torch.device, out: Path) -> dict:
    """pytest -m gpu; the whole log is kept in OUT/gpu_tests.log (the summary line goes into the table)."""
    if device.type != "cuda":
        return {"summary": "skipped: no CUDA device", "rc": None}
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", str(HERE.parent / "tests")],
                           capture_output=True, text=True, timeout=max(30, min(150, DEADLINE[0] - time.monotonic())))
        log, summary, rc = r.stdout + r.stderr, (r.stdout.strip().splitlines() or ["(no output)"])[-1], r.returncode
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        summary, rc = "TIMED OUT (GPU tests did not finish in their share of the budget)", None
    (out / "gpu_tests.log").write_text(log)
    return {"summary": summary, "rc": rc, "seconds": round(time.perf_counter() - t0, 1)}


def kernel_rows(device: torch.device, tiny: bool, bandwidth: float, rows: list, save) -> list:
    """Each kernel x provider x mode; rows are saved as each provider finishes, like every other section's."""
    size, dtype = ("tiny", torch.float32) if tiny else ("m2d", torch.bfloat16)
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
                    traffic = moved[mode]
                    rows.append({"kernel": kernel, "provider": label, "mode": mode, "ms": sec * 1e3,
                                 "min_MB": traffic.minimum / 1e6, "issued_MB": traffic.issued / 1e6,
                                 "GB_s": traffic.minimum / sec / 1e9,
                                 "pct_copy_bw": 100 * traffic.minimum / sec / 1e9 / bandwidth})
            except Exception as e:  # a failing provider is a row, not the end of the suite
                rows.append({"kernel": kernel, "provider": provider, "mode": "-", "error": repr(e)[:200]})
            save()
        for r in rows:
            if r["kernel"] == kernel and ("compile", r["mode"]) in times and "ms" in r:
                r["speedup_vs_compile"] = times[("compile", r["mode"])] * 1e3 / r["ms"]
        save()
    return rows


def train_rows(device: torch.device, tiny: bool, rows: list, save) -> list:
    """The training-step ladder (ladder.py) at the GPU run's sizes, or the dry run's: the same rungs and configs."""
    from ladder import DRY_RUN, GPU_RUN, RUNGS, ladder

    def on_row(row: dict) -> None:
        rows.append(row)
        save()

    ladder(DRY_RUN if tiny else GPU_RUN, RUNGS, steps=1 if tiny else 5, dry_run=tiny, stop=over_budget, on_row=on_row)
    return rows


def data_rows(device: torch.device, tiny: bool, rows: list, save) -> list:
    """Shard loader (all cores), reference loader and DALI (GPU when present) on generated 10 s clips; each row
    under the budget like every other."""
    import tempfile

    from data_cases import dali_rate, embed_rate, make_clips, prepare_rate, reference_loader_rate, shard_loader_rate
    from fastm2d.data.dali import dali_missing_reason

    workers = os.cpu_count() or 1

    def row(path: str, unit: str, measure, workers_used: int = workers) -> None:
        if over_budget():
            rows.append({"path": path, "workers": workers_used, "unit": unit, "note": "skipped: time budget"})
        else:
            try:
                rows.append({"path": path, "workers": workers_used, "unit": unit, "rate": measure()})
            except Exception as e:  # a failing path is a row
                rows.append({"path": path, "workers": workers_used, "unit": unit, "note": f"failed: {e!r}"[:200]})
        save()

    with tempfile.TemporaryDirectory() as tmp:
        clips = Path(tmp) / "clips"
        files = make_clips(clips, 16 if tiny else 256)
        row("prepare", "files/s", lambda: prepare_rate(clips, Path(tmp) / "store", workers)["files_per_s"])
        row("reference loader", "crops/s",
            lambda: reference_loader_rate(files, workers, batch=8, batches=2 if tiny else 8))
        row("shard loader", "crops/s", lambda: shard_loader_rate(Path(tmp) / "store", workers,
                                                                 batch=32 if tiny else 256, batches=3 if tiny else 20))
        if dali_missing_reason():
            rows.append({"path": "DALI", "workers": workers, "unit": "clips/s", "note": dali_missing_reason()})
        else:
            row(f"DALI ({device.type})", "clips/s",
                lambda: dali_rate(files, device, workers, batch=8 if tiny else 64, epochs=1 if tiny else 2))
        row(f"embed a corpus, ViT-B ({device.type})", "clips/s",
            lambda: embed_rate(files[:16 if tiny else 256], device, Path(tmp), batch=16 if tiny else 64,
                               workers=min(workers, 8)), min(workers, 8))
    return rows


def markdown(result: dict) -> str:
    h = result["header"]
    lines = [f"# fastm2d device suite: {h['card']}", "",
             f"torch {h['torch']}, triton {h['triton']}, Python {h['python']}, {h['date']}; "
             f"copy bandwidth {result['copy_GB_s']:.0f} GB/s; GPU tests: {result['gpu_tests']['summary']}", "",
             "GB/s from the minimum bytes (each input read once, each output written once); the Triton design "
             "issues the bytes beside it", "",
             "| kernel | provider | mode | ms | min MB | Triton issues MB | GB/s | % copy BW | x vs compile |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["kernels"]:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['provider']} | error | {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['kernel']} | {r['provider']} | {r['mode']} | {r['ms']:.3f} | {r['min_MB']:.1f} | "
                         f"{r['issued_MB']:.1f} | {r['GB_s']:.0f} | "
                         f"{r['pct_copy_bw']:.0f} | {r.get('speedup_vs_compile', float('nan')):.2f} |")
    train_lines = ["", "MFU = achieved model FLOPs / the card's dense bf16 data-sheet peak; target 40 % (4,700 samples/s "
                       "of ViT-B on an H100 SXM)", "",
                   "| train-step rung | batch | precision | attention | ms | samples/s | x eager | MFU | peak GiB | "
                   "first step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["train"]:
        if "note" in r:
            train_lines.append(f"| {r['rung']} | {r['note']} | | | | | | | | |")
            continue
        mfu_s = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        mem = f"{r['peak_GiB']:.1f}" if r.get("peak_GiB") else "-"
        x = f"{r['x_vs_eager']:.2f}" if "x_vs_eager" in r else "-"
        train_lines.append(f"| {r['rung']} | {r['batch']} | {r['precision']} | {r['attention']} | {r['ms']:.1f} | "
                           f"{r['samples_s']:.1f} | {x} | {mfu_s} | {mem} | {r['first_step_s']:.1f} |")
    lines += ["", "| data path | workers | rate |", "|---|---|---|"]
    for r in result["data"]:
        lines.append(f"| {r['path']} | {r['workers']} | " + (f"{r['rate']:.0f} {r['unit']}" if "rate" in r else r["note"]) + " |")
    return "\n".join(lines + train_lines) + "\n"  # the train-step table last: the short summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/latest"))
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (the dry run)")
    ap.add_argument("--budget-s", type=float, default=300, help="skip the remaining rows after this many seconds")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        print("device_suite: no CUDA device here; the GPU run needs one (use --tiny for the CPU dry run)",
              file=sys.stderr)
        return 2
    DEADLINE[0] = time.monotonic() + args.budget_s
    tiny = args.tiny
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"header": header(device), "gpu_tests": {"summary": "not run"}, "copy_GB_s": float("nan"),
              "kernels": [], "train": [], "data": []}

    def save() -> None:  # after every row and section: a kill, or a lease that ends, keeps what was measured
        (out / "device_suite.json").write_text(json.dumps(result, indent=1))
        (out / "device_suite.md").write_text(markdown(result))

    sections = [("gpu_tests", lambda: gpu_tests(device, out)), ("copy_GB_s", lambda: copy_bandwidth(device, tiny)),
                ("kernels", lambda: kernel_rows(device, tiny, result["copy_GB_s"], result["kernels"], save)),
                ("train", lambda: train_rows(device, tiny, result["train"], save)),
                ("data", lambda: data_rows(device, tiny, result["data"], save))]
    for name, run in sections:  # in order of importance
        try:
            result[name] = run()
        except Exception as e:  # a failed section (a missing package on the GPU machine) is a note, not the end
            note = f"failed: {e!r}"[:200]
            result[name] = {"summary": note} if name == "gpu_tests" else float("nan") if name == "copy_GB_s" else \
                [*(result[name] if isinstance(result[name], list) else []),
                 {"kernel": "-", "provider": "-", "mode": "-", "error": note, "rung": "-", "note": note,
                  "path": "-", "workers": "-"}]
        save()
    print(markdown(result))
    return 1 if result["gpu_tests"].get("rc") not in (None, 0) else 0


if __name__ == "__main__":
    sys.exit(main())
