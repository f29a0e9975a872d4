"""What each child process of the device suite measures (benchmarks/device_suite.py runs one per item, killed at its
deadline): one training rung, the profiled recipe step, the copy bandwidth, one kernel's providers, the GPU tests,
the data paths. Each returns its row (or rows) as plain JSON-able dicts; a failure inside is a row saying so.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent


def run_item(child: str, tiny: bool, out: Path, peak_tflops: Optional[float]):
    section, item = child.split(":", 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if section in ("recipe", "ladder"):
        return rung_row(item, tiny, peak_tflops)
    if section == "trace":
        return trace_row(tiny, out, peak_tflops)
    if section == "kernels":
        return copy_bandwidth_row(device, tiny) if item == "copy bandwidth" else kernel_rows(item, device, tiny)
    if section == "gpu_tests":
        return gpu_tests_row(device, out)
    if section == "data":
        return data_rows(device, tiny)
    raise SystemExit(f"device_suite: no section {section!r}")


def _sizes(tiny: bool) -> dict:
    from ladder import DRY_RUN, GPU_RUN
    return DRY_RUN if tiny else GPU_RUN


def rung_row(name: str, tiny: bool, peak_tflops: Optional[float]) -> dict:
    from ladder import RUNGS, measure_rung, rung_config
    overrides, recipe = next((o, r) for n, o, r in RUNGS if n == name)
    sizes = _sizes(tiny)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = rung_config(overrides, recipe, sizes["model"], sizes["batch"], tmp, dry_run=tiny, name=name,
                          peak_tflops=peak_tflops if tiny else None)
        row = measure_rung(name, cfg, steps=1 if tiny else 5)
    row["compile"] = f"{cfg.train.compile_backend} ({cfg.train.compile_mode})" if cfg.train.compile else "-"
    return row


def trace_row(tiny: bool, out: Path, peak_tflops: Optional[float]) -> dict:
    """A few profiled steps of the recipe (eager, as `pretrain` runs it): the gzipped trace and the phase table come
    back in $OUT (trace-rank0.json.gz, well under the 16 MiB a file a GPU slot returns), the table in the row."""
    from ladder import RECIPE_NAME, RUNGS, profiled_steps, rung_config
    overrides = next(o for n, o, _ in RUNGS if n == RECIPE_NAME)
    sizes = _sizes(tiny)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = rung_config([*overrides, "train.profile.start=2", "train.profile.steps=2"], True, sizes["model"], sizes["batch"], tmp,
                          dry_run=tiny, name=RECIPE_NAME, peak_tflops=peak_tflops if tiny else None)
        return profiled_steps(cfg, out)


def copy_bandwidth_row(device: torch.device, tiny: bool) -> dict:
    """GB/s of a plain device-to-device copy (read + write), the yardstick for memory-bound kernels."""
    from kernel_cases import time_median
    x = torch.empty(int(2**26 if tiny else 2**30) // 4, device=device)
    y = torch.empty_like(x)
    sec = time_median(lambda: y.copy_(x), device)
    return {"GB_s": 2 * x.numel() * 4 / sec / 1e9}


def kernel_rows(kernel: str, device: torch.device, tiny: bool) -> list:
    """One kernel x each provider x mode. On CPU the interpreter times NumPy (no Triton row but the flat EMA, which is
    plain PyTorch) and compile rows are left out (minutes of C++ builds, not the comparison that matters)."""
    from kernel_cases import CASES, MODES, PROVIDERS, time_median
    labels = {"triton": "flat lerp_", "eager": "foreach_lerp_ (used)", "compile": "compiled foreach"}
    size, dtype = ("tiny", torch.float32) if tiny else ("m2d", torch.bfloat16)
    rows, times = [], {}
    for provider in PROVIDERS:
        if device.type != "cuda" and (provider == "compile" or (provider == "triton" and kernel != "ema")):
            continue
        try:
            fns, moved = CASES[kernel](provider, size, dtype, device)
            for mode in (MODES if kernel != "ema" else ("full",)):
                sec = time_median(fns[mode], device)
                times[(provider, mode)] = sec
                traffic = moved[mode]
                rows.append({"kernel": kernel, "provider": labels[provider] if kernel == "ema" else provider,
                             "mode": mode, "ms": sec * 1e3, "min_MB": traffic.minimum / 1e6,
                             "issued_MB": traffic.issued / 1e6, "GB_s": traffic.minimum / sec / 1e9,
                             "_provider": provider})
        except Exception as e:  # a failing provider is a row, not the end of the kernel
            rows.append({"kernel": kernel, "provider": provider, "mode": "-", "error": repr(e)[:200]})
    for r in rows:
        key = ("compile", r.get("mode"))
        if "ms" in r and key in times:
            r["speedup_vs_compile"] = times[key] * 1e3 / r["ms"]
        r.pop("_provider", None)
    return rows


def gpu_tests_row(device: torch.device, out: Path) -> dict:
    """pytest -m gpu; the whole log in OUT/gpu_tests.log, the summary line in the row."""
    if device.type != "cuda":
        return {"summary": "skipped: no CUDA device", "rc": None}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", str(HERE.parent / "tests")],
                       capture_output=True, text=True)
    (out / "gpu_tests.log").write_text(r.stdout + r.stderr)
    return {"summary": (r.stdout.strip().splitlines() or ["(no output)"])[-1], "rc": r.returncode}


def data_rows(device: torch.device, tiny: bool) -> list:
    """prepare, the reference loader, the shard loader on all cores, DALI (GPU where present), embed of a corpus."""
    from data_cases import dali_rate, embed_rate, make_clips, prepare_rate, reference_loader_rate, shard_loader_rate
    from fastm2d.data.dali import dali_missing_reason
    workers = os.cpu_count() or 1
    rows = []

    def row(path: str, unit: str, measure, workers_used: int = workers) -> None:
        try:
            rows.append({"path": path, "workers": workers_used, "unit": unit, "rate": measure()})
        except Exception as e:  # a failing path is a row
            rows.append({"path": path, "workers": workers_used, "unit": unit, "note": f"failed: {e!r}"[:200]})

    with tempfile.TemporaryDirectory() as tmp:
        clips = Path(tmp) / "clips"
        files = make_clips(clips, 16 if tiny else 256)
        row("prepare", "files/s", lambda: prepare_rate(clips, Path(tmp) / "store", workers)["files_per_s"])
        row("reference loader", "crops/s",
            lambda: reference_loader_rate(files, workers, batch=8, batches=2 if tiny else 8))
        row("shard loader", "crops/s", lambda: shard_loader_rate(Path(tmp) / "store", workers,
                                                                 batch=32 if tiny else 256, batches=3 if tiny else 20))
        if dali_missing_reason():  # on the lent GPU machines always: DALI's wheel cannot be carried (docs/kernels.md)
            rows.append({"path": "DALI", "workers": workers, "unit": "clips/s", "note": dali_missing_reason()})
        else:
            row(f"DALI ({device.type})", "clips/s",
                lambda: dali_rate(files, device, workers, batch=8 if tiny else 64, epochs=1 if tiny else 2))
        row(f"embed a corpus, ViT-B ({device.type})", "clips/s",
            lambda: embed_rate(files[:4 if tiny else 256], device, Path(tmp), batch=4 if tiny else 64,
                               workers=min(workers, 8)), min(workers, 8))
    return rows
